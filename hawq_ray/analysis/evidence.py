"""Evidence that the search chooses well (the ablation of HAWQ-V2 / V3, as a routine output): each config of a
budget (the ILP's, random ones, the reversed one; `solver.alternatives`) quantized without fine-tuning and run
by the integer executor on held-out data, then compared.

Per config: top-1, the cross-entropy loss, and the KL divergence of the integer model's predictive distribution
from the fp32 model's, KL(p_fp32 || p_int) averaged over the held-out samples: it measures what quantization
changed even where top-1 saturates. Over the configs: the Spearman rank correlation between the predicted sum
of Omega (what the ILP minimizes, HAWQ-V3 Eq. 8) and the measured KL, and per budget the ILP config's standing
among the random ones and against the reversed one.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hawq_ray.quant.finetune import Recipe, calibrated, integer_logits, labels_of


def logit_metrics(fp32: torch.Tensor, quantized: torch.Tensor, labels: torch.Tensor) -> dict:
    """top1 and loss (cross-entropy) of the quantized logits, and their mean KL(p_fp32 || p_quantized)."""
    ref, got = F.log_softmax(fp32.double(), 1), F.log_softmax(quantized.double(), 1)
    return {"top1": float((got.argmax(1) == labels).double().mean()),
            "loss": float(F.nll_loss(got, labels)),
            "kl": float((ref.exp() * (ref - got)).sum(1).mean())}


def evaluate_bits(model, bits: dict, data, input_shape, fp32: torch.Tensor, table=None,
                  recipe: Recipe = Recipe()) -> dict:
    """The metrics of one bit config after post-training quantization (calibrated on the train split) on the
    held-out split; `fp32` holds the float model's logits there (`float_logits(model, data.test)`)."""
    qm = calibrated(model, bits, data.train, recipe, input_shape, table)
    return logit_metrics(fp32, integer_logits(qm, data.test), labels_of(data.test))


def ranks(x) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        r[tied] = r[tied].mean()
    return r


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks (NaN when either side is constant)."""
    rx, ry = ranks(x), ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def standing(rows: pd.DataFrame) -> pd.DataFrame:
    """Per budget: the ILP config's KL, how many random configs it was compared with, the fraction of them whose
    KL is higher (ties count half), its rank among them (1 = lowest KL), the reversed config's KL, and whether the
    ILP's is lower (None where the reversed config is the ILP's own)."""
    out = []
    for budget, group in rows.groupby("budget", sort=False):
        ilp = group[group["kind"] == "ilp"].iloc[0]
        rand = group.loc[group["kind"] == "random", "kl"].to_numpy(float)
        rev = group[group["kind"] == "reversed"]
        beaten = float(((rand > ilp["kl"]).sum() + 0.5 * (rand == ilp["kl"]).sum()) / len(rand)) if len(rand) \
            else np.nan
        same = rev.empty or rev["config"].iloc[0] == ilp["config"]
        out.append({"budget": budget, "ilp_config": ilp["config"], "ilp_kl": float(ilp["kl"]), "randoms": len(rand),
                    "beats_random_fraction": beaten, "rank": int((rand < ilp["kl"]).sum()) + 1,
                    "reversed_kl": float(rev["kl"].iloc[0]) if len(rev) else np.nan,
                    "beats_reversed": None if same else bool(ilp["kl"] < rev["kl"].iloc[0])})
    return pd.DataFrame(out)


def omega_kl_correlation(rows: pd.DataFrame) -> tuple[float, int]:
    """Spearman's correlation between predicted sum Omega and measured KL over the distinct configs, and their
    number. (A config that several budgets share counts once.)"""
    distinct = rows.drop_duplicates("config")
    return spearman(distinct["predicted_omega"], distinct["kl"]), len(distinct)
