"""Typed configuration of the metrics endpoint."""

from pydantic import BaseModel, ConfigDict, Field


class MetricsConfig(BaseModel):
    """Where a service serves Prometheus `/metrics`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", min_length=1, description="Interface of the /metrics server.")
    port: int = Field(
        9464,
        ge=0,
        le=65535,
        description="Port of the /metrics server; 0 picks a free one (env FINPULSE_METRICS__PORT).",
    )
