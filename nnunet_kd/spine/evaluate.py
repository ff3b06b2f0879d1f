"""Per-vertebra scores of an instance label map against the reference, whatever the two numberings are.

Vertebrae are matched by overlap: each reference vertebra takes the predicted label covering most of it. A
reference vertebra is *detected* when that match has Dice >= 0.5, *missed* when no prediction covers at least 10 %
of it, *split* when two or more predictions each cover at least 10 % of it; a prediction is *merged* when it covers
at least 10 % of two or more reference vertebrae, and *spurious* when it covers no reference vertebra that much.
HD95 (mm) is the 95th percentile of the symmetric surface distances of each matched pair.
"""
from __future__ import annotations

import numpy as np

from nnunet_kd.evaluation.surface import hd95

SUBSTANTIAL = 0.1
DETECTED_DICE = 0.5


def score_vertebrae(reference: np.ndarray, prediction: np.ndarray, spacing_zyx) -> dict:
    """Per reference vertebra its match, Dice and HD95; counts of detected, missed, split, merged and spurious."""
    ref_labels = [int(v) for v in np.unique(reference) if v]
    pred_labels = [int(v) for v in np.unique(prediction) if v]
    both = reference.astype(np.int64) * (int(prediction.max()) + 1) + prediction
    pairs, counts = np.unique(both[(reference > 0) & (prediction > 0)], return_counts=True)
    overlap = {(int(p // (prediction.max() + 1)), int(p % (prediction.max() + 1))): int(c)
               for p, c in zip(pairs, counts)}
    ref_size = {r: int((reference == r).sum()) for r in ref_labels}
    pred_size = {p: int((prediction == p).sum()) for p in pred_labels}
    vertebrae = []
    for r in ref_labels:
        covering = {p: c for (rr, p), c in overlap.items() if rr == r}
        substantial = [p for p, c in covering.items() if c >= SUBSTANTIAL * ref_size[r]]
        row = {"reference_label": r, "predicted_label": None, "dice": 0.0, "hd95_mm": float("nan"),
               "missed": not substantial, "split": len(substantial) > 1}
        if covering:
            p = max(covering, key=covering.get)
            row["predicted_label"] = p
            row["dice"] = 2 * covering[p] / (ref_size[r] + pred_size[p])
            row["hd95_mm"] = hd95(reference == r, prediction == p, spacing_zyx)
        row["detected"] = row["dice"] >= DETECTED_DICE
        vertebrae.append(row)
    merged = [p for p in pred_labels
              if sum(c >= SUBSTANTIAL * ref_size[r] for (r, pp), c in overlap.items() if pp == p) > 1]
    spurious = [p for p in pred_labels if not any(pp == p and c >= SUBSTANTIAL * ref_size[r]
                                                  for (r, pp), c in overlap.items())]
    detected = [v for v in vertebrae if v["detected"]]
    return {
        "vertebrae": vertebrae, "reference_count": len(ref_labels), "predicted_count": len(pred_labels),
        "detected": len(detected), "detection_rate": len(detected) / len(ref_labels) if ref_labels else float("nan"),
        "missed": sum(v["missed"] for v in vertebrae), "split": sum(v["split"] for v in vertebrae),
        "merged": len(merged), "spurious": len(spurious),
        "mean_dice": float(np.mean([v["dice"] for v in vertebrae])) if vertebrae else float("nan"),
        "mean_hd95_mm_detected": float(np.nanmean([v["hd95_mm"] for v in detected])) if detected else float("nan"),
    }
