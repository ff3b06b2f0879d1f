"""Plans dicts modelled on an nnU-Net 2.8 `nnUNetPlans.json`, shared by the unit tests of plans and teacher handling."""
from __future__ import annotations

import copy

DATASET = "Dataset042_Liver"


def _plain_unet_arch(dim: int, n_stages: int, features: list[int], kernel_sizes: list, strides: list) -> dict:
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": features,
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": kernel_sizes,
            "strides": strides,
            "n_conv_per_stage": [2] * n_stages,
            "n_conv_per_stage_decoder": [2] * (n_stages - 1),
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def _realistic_plans() -> dict:
    """A CT dataset's plans in the nnU-Net 2.8 layout: 2d, 3d_fullres, 3d_lowres (inheriting) and a ResEnc config."""
    resampling = {
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
    }
    resenc = _plain_unet_arch(3, 4, [32, 64, 128, 256], [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                              [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]])
    resenc["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    resenc["arch_kwargs"]["n_blocks_per_stage"] = [1, 3, 4, 6]
    resenc["arch_kwargs"]["n_conv_per_stage_decoder"] = [1, 1, 1]
    del resenc["arch_kwargs"]["n_conv_per_stage"]
    return {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 0.79, 0.79],
        "original_median_shape_after_transp": [90, 196, 163],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "2d": {
                "data_identifier": "nnUNetPlans_2d",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 12,
                "patch_size": [192, 160],
                "median_image_size_in_voxels": [196.0, 163.0],
                "spacing": [0.79, 0.79],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                **copy.deepcopy(resampling),
                "architecture": _plain_unet_arch(2, 6, [32, 64, 128, 256, 512, 512], [[3, 3]] * 6,
                                                 [[1, 1]] + [[2, 2]] * 5),
                "batch_dice": True,
            },
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [64, 96, 96],
                "median_image_size_in_voxels": [90.0, 196.0, 163.0],
                "spacing": [2.0, 0.79, 0.79],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                **copy.deepcopy(resampling),
                "architecture": _plain_unet_arch(3, 4, [32, 64, 128, 256],
                                                 [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
                                                 [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]),
                "batch_dice": False,
            },
            "3d_lowres": {
                "inherits_from": "3d_fullres",
                "data_identifier": "nnUNetPlans_3d_lowres",
                "spacing": [3.0, 1.6, 1.6],
                "median_image_size_in_voxels": [60, 97, 81],
            },
            "3d_fullres_resenc": {
                "data_identifier": "nnUNetResEncUNetMPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [80, 128, 112],
                "median_image_size_in_voxels": [90.0, 196.0, 163.0],
                "spacing": [2.0, 0.79, 0.79],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                **copy.deepcopy(resampling),
                "architecture": resenc,
                "batch_dice": False,
            },
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 3071.0, "mean": 99.4, "median": 101.0, "min": -1024.0, "percentile_00_5": -17.0,
                  "percentile_99_5": 201.0, "std": 37.1},
        },
    }


def _dataset_json() -> dict:
    return {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumor": 2}, "numTraining": 12,
            "file_ending": ".nii.gz"}
