"""The long-lived objects of one API process, built at start-up and shared by the routes."""

from __future__ import annotations

from dataclasses import dataclass

from app.api.predictor import PredictorPool
from app.domain.backend import Backend
from app.domain.metrics import Metrics
from app.domain.settings import Settings


@dataclass
class Services(Backend):
    """The domain's connections plus what only the API holds.

    Attributes:
        predictors: Ready posteriors and their micro-batchers.
        metrics: Prometheus metrics.
    """

    predictors: PredictorPool
    metrics: Metrics

    @classmethod
    def build(cls, settings: Settings, redis_url: str, metrics: Metrics) -> Services:
        """Connects to Redis at ``redis_url`` and opens the store of ``settings``."""
        fields = cls.connect_fields(settings, redis_url)
        predictors = PredictorPool(settings, fields["catalog"], fields["cache"], metrics)
        return cls(**fields, predictors=predictors, metrics=metrics)

    def close(self) -> None:
        """Releases threads and connections."""
        self.predictors.close()
        super().close()
