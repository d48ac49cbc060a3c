"""Out-of-distribution flags: a named uncertainty score and a threshold calibrated on in-distribution data.

The threshold is a quantile (default 95 %) of the score on held-out in-distribution inputs, so by construction
about 5 % of in-distribution inputs are flagged; nothing about the out-of-distribution data is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from .predictive import OOD_SCORES, ood_score_of

if TYPE_CHECKING:
    from .posterior import LaplacePosterior


def calibrate_ood(
    post: LaplacePosterior,
    x_heldout: Tensor,
    quantile: float = 0.95,
    samples: int = 100,
    predictive: str = "mc",
    scores: tuple[str, ...] | None = None,
    link: str | None = None,
    outputs: dict[str, Tensor] | None = None,
) -> dict[str, float]:
    """Store on ``post`` the ``quantile`` of each OOD score over held-out in-distribution inputs.

    Thresholds are kept per predictive (``post.ood_table[predictive][score]``): the scores of the MC and the
    linearised predictive live on different scales.

    ``outputs``: the predictive on ``x_heldout`` if already computed with these settings (validation tuning
    returns it), so calibration costs nothing more.

    Returns:
        The thresholds, keyed by score name.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}.")
    if x_heldout.shape[0] < 2:
        raise ValueError("Need at least two held-out inputs to calibrate an OOD threshold.")
    from .likelihoods import Gaussian

    if scores is None:
        scores = ("entropy", "mutual_information") if isinstance(post.likelihood, Gaussian) else OOD_SCORES
    predictive = predictive or post.default_predictive
    out = outputs
    if out is None:
        out = post.predict(x_heldout, samples=samples, predictive=predictive, ood_score=scores[0], link=link)
    thresholds = {}
    for score in scores:
        values = ood_score_of(out, score).double()
        thresholds[score] = float(values.quantile(quantile))
    post.ood_table.setdefault(predictive, {}).update(thresholds)
    post.metadata["ood_quantile"] = quantile
    return thresholds
