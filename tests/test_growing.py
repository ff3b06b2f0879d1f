"""Width slicing and growth of the growing teacher-assistant's master network (nnunet_kd/students/growing.py), on
CPU."""
from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_kd.architectures.lcovnet import LCOVNet
from nnunet_kd.core.settings import GrowingAssistantSettings, KDConfigurationError
from nnunet_kd.students.growing import ChannelSlice, GrowthStage, growth_schedule, silence_added_channels, stage_at

STUDENT, ASSISTANT, MASTER = (4, 8, 16, 32), (8, 16, 24, 48), (16, 32, 64, 128)


def _norm(dim: int) -> tuple[type, type]:
    return (nn.Conv3d, nn.InstanceNorm3d) if dim == 3 else (nn.Conv2d, nn.InstanceNorm2d)


def plain_unet(widths, dim: int = 3) -> nn.Module:
    conv, norm = _norm(dim)
    return PlainConvUNet(2, 4, widths, conv, 3, (1, 2, 2, 2), 2, 3, (2, 2, 2), True, norm,
                         {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True)


def residual_unet(widths, dim: int = 3) -> nn.Module:
    conv, norm = _norm(dim)
    return ResidualEncoderUNet(2, 4, widths, conv, 3, (1, 2, 2, 2), (1, 2, 2, 2), 3, (1, 1, 1), True, norm,
                               {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                               deep_supervision=True)


BUILDS = [(plain_unet, 3), (residual_unet, 3), (plain_unet, 2)]
IDS = ["plain-3d", "residual-encoder-3d", "plain-2d"]


def _input(dim: int) -> torch.Tensor:
    return torch.randn(2, 2, *([16] * dim))


def _max_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("build,dim", BUILDS, ids=IDS)
def test_student_slice_computes_what_the_master_computes_without_its_other_channels(build, dim):
    # with every channel beyond the student's silenced, the master network *is* the student; the slice must compute
    # exactly that, which fails if any weight (the concatenating decoder convs above all) is sliced wrongly
    master = build(MASTER, dim)
    student = ChannelSlice(master, build(STUDENT, dim))
    silence_added_channels(student, ChannelSlice(master, master))
    x = _input(dim)
    with torch.no_grad():
        expected = master(x)
        sliced = student(x)
        standalone = build(STUDENT, dim)
        ChannelSlice(master, standalone).copy_into_narrow()
        copied = standalone(x)
    assert [o.shape for o in sliced] == [o.shape for o in copied]
    assert _max_difference(sliced, expected) < 1e-5
    assert _max_difference(copied, expected) < 1e-5


def test_concatenating_decoder_convs_take_the_first_channels_of_each_half():
    master = plain_unet(MASTER)
    student = ChannelSlice(master, plain_unet(STUDENT))
    # decoder stage 0 reads cat([upsampled (64 of 64), skip (64 of 64)]) in the master, [32, 32] in the student
    index = student.input_channels("decoder.stages.0.convs.0.conv.weight")
    assert index.tolist() == list(range(16)) + list(range(64, 80))
    assert student.input_channels("encoder.stages.1.0.convs.0.conv.weight").tolist() == list(range(4))
    assert student.input_channels("decoder.transpconvs.0.weight").tolist() == list(range(32))  # dim 0 is the input
    assert student.input_channels("encoder.stages.0.0.convs.0.conv.weight") is None  # the image channels, all of them


def test_slice_runs_on_the_master_weights_and_leaves_its_own_untouched():
    master = plain_unet(MASTER)
    narrow = plain_unet(STUDENT)
    own = {n: p.detach().clone() for n, p in narrow.named_parameters()}
    student = ChannelSlice(master, narrow)
    student(_input(3))[0].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in master.decoder.seg_layers[-1].parameters())
    assert master.encoder.stages[0][0].convs[0].conv.weight.grad[STUDENT[0]:].abs().sum() == 0  # unused channels
    for name, p in narrow.named_parameters(remove_duplicate=False):
        assert p.is_leaf and p.grad is None, f"{name} was left replaced by a slice"
    assert all(torch.equal(p, own[n]) for n, p in narrow.named_parameters())


@pytest.mark.parametrize("build,dim", BUILDS, ids=IDS)
def test_growth_keeps_the_assistant_output(build, dim):
    master = build(MASTER, dim)
    before = ChannelSlice(master, build(ASSISTANT, dim))
    after = ChannelSlice(master, build(MASTER, dim))
    x = _input(dim)
    with torch.no_grad():
        expected = before(x)
        changed = after(x)
    assert _max_difference(changed, expected) > 1e-2  # without silencing, the new channels change the output
    zeroed = silence_added_channels(before, after)
    with torch.no_grad():
        grown = after(x)
    assert zeroed > 0
    assert _max_difference(grown, expected) < 1e-5  # equal up to float summation order


def test_silenced_channels_learn_and_their_optimiser_state_is_reset():
    master = plain_unet(MASTER)
    before, after = ChannelSlice(master, plain_unet(ASSISTANT)), ChannelSlice(master, plain_unet(MASTER))
    optimizer = torch.optim.SGD(master.parameters(), 0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
    for _ in range(2):
        optimizer.zero_grad()
        before(_input(3))[0].square().mean().backward()
        optimizer.step()
    weight = master.encoder.stages[1][0].convs[1].conv.weight  # reads encoder stage 1's channels
    new = slice(ASSISTANT[1], MASTER[1])
    assert optimizer.state[weight]["momentum_buffer"][:, new].abs().sum() > 0  # weight decay reached unused entries

    silence_added_channels(before, after, optimizer)
    assert weight[:, new].abs().sum() == 0 and optimizer.state[weight]["momentum_buffer"][:, new].abs().sum() == 0
    assert weight[:, : ASSISTANT[1]].abs().sum() > 0 and weight[new].abs().sum() > 0  # old columns, new rows kept

    optimizer.zero_grad()
    after(_input(3))[0].square().mean().backward()
    optimizer.step()
    assert weight[:, new].abs().sum() > 0, "the silenced fan-out must start learning"


def test_growth_schedule_spreads_stages_over_the_run():
    schedule = growth_schedule([4, 8], [16, 32], num_stages=4, num_epochs=100)
    assert schedule == [GrowthStage(0, (7, 14)), GrowthStage(25, (10, 20)), GrowthStage(50, (13, 26)),
                        GrowthStage(75, (16, 32))]
    assert [stage_at(schedule, e) for e in (0, 24, 25, 74, 99)] == [0, 0, 1, 2, 3]
    short = growth_schedule([4, 8], [16, 32], num_stages=4, num_epochs=2)
    assert [stage_at(short, e) for e in (0, 1)] == [1, 3]  # several stages start at once: the widest wins
    assert growth_schedule([4], [16], num_stages=1, num_epochs=10) == [GrowthStage(0, (16,))]
    with pytest.raises(KDConfigurationError):
        growth_schedule([4], [16], num_stages=0, num_epochs=10)


def test_only_nnunet_unets_can_be_sliced():
    lcovnet = LCOVNet(1, 3, n_stages=3, features_per_stage=[8, 16, 32], conv_op=nn.Conv3d, kernel_sizes=3,
                      strides=[1, 2, 2], n_conv_per_stage=2, n_conv_per_stage_decoder=2, conv_bias=True,
                      norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.ReLU)
    with pytest.raises(KDConfigurationError, match="student-plans --arch plain"):
        ChannelSlice(plain_unet(MASTER), lcovnet)


@pytest.mark.parametrize("changes,message", [({"max_width": 1.0}, "max_width"), ({"stages": 0}, "stages"),
                                             ({"temperature": 0.0}, "temperature")])
def test_growing_assistant_settings_are_validated(changes, message):
    with pytest.raises(KDConfigurationError, match=message):
        GrowingAssistantSettings(**changes)
    environment = {f"nnUNet_KD_{k}": str(v) for k, v in {"max_width": 2.5, "stages": 3}.items()}
    assert GrowingAssistantSettings().with_environment(environment) == GrowingAssistantSettings(max_width=2.5,
                                                                                                stages=3)


def _batchnorm_unet(widths) -> nn.Module:
    return PlainConvUNet(2, 4, widths, nn.Conv3d, 3, (1, 2, 2, 2), 2, 3, (2, 2, 2), True, nn.BatchNorm3d,
                         {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
                         deep_supervision=True)


def test_the_student_keeps_its_own_batchnorm_statistics():
    """With BatchNorm plans, the assistant's forward passes must not write into the student's running statistics:
    the exported student carries the statistics a student trained alone on the same batches would have."""
    master = _batchnorm_unet(MASTER)
    student = ChannelSlice(master, _batchnorm_unet(STUDENT), own_buffers=True)
    assistant = ChannelSlice(master, _batchnorm_unet(ASSISTANT))
    alone = _batchnorm_unet(STUDENT)
    with torch.no_grad():
        for name, tensor in student.tensors().items():
            alone.get_parameter(name).copy_(tensor)
    for network in (master, student.narrow, assistant.narrow, alone):
        network.train()
    for _ in range(3):
        x = _input(3)
        with torch.no_grad():
            assistant(x)
            student(x)
            alone(x)
    for name, buffer in alone.named_buffers():
        assert torch.equal(student.narrow.get_buffer(name), buffer), name
    assert int(student.narrow.get_buffer("encoder.stages.0.0.convs.0.norm.num_batches_tracked")) == 3
    # the assistant's statistics are the master's
    assert int(master.get_buffer("encoder.stages.0.0.convs.0.norm.num_batches_tracked")) == 3
