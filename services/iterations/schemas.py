"""Request and response models of the jobs API; the request models are generated from the
step configs (services/iterations/config_models.py)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from services.errors import Invalid, describe_validation_error
from services.iterations.config_models import (
    ConfigRequest,
    ConfigSource,
    build_config,
    help_of,
    request_model,
    strict,
)
from services.iterations.pipeline_config import PipelineConfig
from workers.learning.config_build import API_NAMES, IMPROVEMENT_CONFIGS
from workers.learning.configs import QFitConfig
from workers.learning.returns import ReturnsConfig

ALGORITHMS = ("ppo", "rloo", "grpo", "dmpo", "dpo")
DEFAULT_ALGORITHM = "ppo"

# The improvement samples, scores and takes the KL at the sampling the policy is served with.
_SERVED = {
    "temperature": "the served temperature (OUTCOMELOOP_TEMPERATURE); another value is refused",
    "top_p": "the served top_p (OUTCOMELOOP_TOP_P); another value is refused",
}

QFitHyperparameters = request_model(
    "QFitHyperparameters",
    "How Q(s, a) is fitted (QFitConfig).",
    ConfigSource(QFitConfig, filled={"base_model": "the parent policy's base model"}),
)

IterationData = request_model(
    "IterationData",
    "The data window and decision sources (ReturnsConfig), and the pipeline (PipelineConfig).",
    ConfigSource(ReturnsConfig),
    ConfigSource(PipelineConfig),
)


def _hyperparameters_model(algorithm: str) -> type[ConfigRequest]:
    config = IMPROVEMENT_CONFIGS[algorithm]
    return request_model(
        f"{algorithm.upper()}Hyperparameters",
        f"{config.__doc__.splitlines()[0] if config.__doc__ else algorithm} Also gamma (the "
        "returns' discount) and q (the Q fit).",
        ConfigSource(
            config,
            api_names={field: api for api, field in API_NAMES[algorithm].items()},
            filled=_SERVED,
            # DMPO's turn discount is the iteration's one gamma (below), as in the returns.
            exclude=frozenset({"gamma"}),
        ),
        extra={
            "gamma": (
                strict(float | None),
                Field(
                    default=None,
                    description=f"{help_of(ReturnsConfig, 'gamma')} Or data.gamma; not both."
                    + (
                        " DMPO's turn weights phi(t, T) use it too (the MDP has one discount)."
                        if algorithm == "dmpo"
                        else ""
                    ),
                ),
            ),
            "q": (
                QFitHyperparameters,
                Field(default_factory=QFitHyperparameters, description="The Q fit's config."),
            ),
        },
    )


class IterationRequest(BaseModel):
    """What every algorithm's request has; one model per algorithm is generated below."""

    model_config = ConfigDict(extra="forbid")

    algorithm: str
    hyperparameters: ConfigRequest
    data: ConfigRequest
    parent_policy_id: str | None = Field(
        default=None, description="pi_i; default: the policy currently serving the scope."
    )

    @model_validator(mode="after")
    def _check_gamma(self) -> Self:
        """gamma may come with the hyperparameters (as in fine-tuning job APIs) or the data."""
        given = {self.hyperparameter_values().get("gamma"), self.data_values().get("gamma")}
        values = sorted(float(g) for g in given if g is not None)
        if len(values) > 1:
            raise ValueError(
                f"gamma: hyperparameters.gamma and data.gamma differ {values}; give one"
            )
        build_config(ReturnsConfig, self.returns_values())  # data was checked without it
        return self

    def hyperparameter_values(self) -> dict[str, Any]:
        """The hyperparameters given, by config field name (q and gamma included)."""
        return self.hyperparameters.model_dump(exclude_unset=True)

    def data_values(self) -> dict[str, Any]:
        """The data fields given (ReturnsConfig's and PipelineConfig's)."""
        return self.data.model_dump(exclude_unset=True)

    def returns_values(self) -> dict[str, Any]:
        """The ReturnsConfig fields given: the data's, and hyperparameters.gamma."""
        gamma = self.hyperparameter_values().get("gamma")
        return {**self.data_values(), **({"gamma": gamma} if gamma is not None else {})}


def _request_model(algorithm: str) -> type[IterationRequest]:
    hyperparameters = _hyperparameters_model(algorithm)
    return create_model(
        f"{algorithm.upper()}IterationCreate",
        __base__=IterationRequest,
        __doc__=f"A {algorithm} iteration of pi_i.",
        algorithm=(Literal[algorithm], Field(default=algorithm)),  # type: ignore[arg-type]
        hyperparameters=(
            hyperparameters,
            Field(
                default_factory=hyperparameters,
                description="beta (KL to pi_i), gamma, n_epochs, batch_size, learning_rate, any "
                f"field of the {algorithm} config, and q (the Q fit).",
            ),
        ),
        data=(IterationData, Field(default_factory=IterationData)),
    )


def _algorithm_of(value: Any) -> str | None:
    """The union's tag: the body's algorithm, ppo when unset (None: no model matches)."""
    if isinstance(value, dict):
        tag = value.get("algorithm", DEFAULT_ALGORITHM)
    else:
        tag = getattr(value, "algorithm", DEFAULT_ALGORITHM)
    return tag if isinstance(tag, str) else None


REQUEST_MODELS: dict[str, type[IterationRequest]] = {a: _request_model(a) for a in ALGORITHMS}

if TYPE_CHECKING:
    IterationCreate = IterationRequest
else:
    # The request body: the model of its `algorithm` (ppo when unset).
    IterationCreate = Annotated[
        Union[tuple(Annotated[m, Tag(a)] for a, m in REQUEST_MODELS.items())],  # noqa: UP007
        Discriminator(
            _algorithm_of,
            custom_error_type="invalid_algorithm",
            custom_error_message=f"algorithm must be one of {', '.join(ALGORITHMS)}",
        ),
    ]

_ADAPTER: TypeAdapter[IterationRequest] = TypeAdapter(IterationCreate)


def parse_iteration_request(raw: Mapping[str, Any]) -> IterationRequest:
    """Validate a request as the API does (for the CLI, beat and the demo); Invalid names the
    field."""
    try:
        return _ADAPTER.validate_python(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(describe_validation_error(e) for e in exc.errors())
        raise Invalid(f"invalid iteration request: {problems}") from None


def iteration_request_schema() -> dict[str, Any]:
    """The JSON schema of the request body (every config field, with defaults and help)."""
    return _ADAPTER.json_schema()


class RetryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    override_gate: bool = False


class StepOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: str
    status: str
    attempts: int
    worker: str | None
    result: dict[str, Any] | None
    error: str | None
    started_at: datetime
    finished_at: datetime | None


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    kind: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class IterationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["iteration"] = "iteration"
    status: str
    algorithm: str
    hyperparameters: dict[str, Any]
    data: dict[str, Any]
    configs: dict[str, Any]
    parent_policy_id: str
    candidate_policy_id: str | None
    experiment_id: str | None
    current_step: str | None
    progress: float
    metrics: dict[str, Any]
    error: str | None
    override_gate: bool
    trigger: str
    created_at: datetime
    finished_at: datetime | None
    steps: list[StepOut]
    # Events: GET /v1/iterations/{id}/events (a page), so that the job stays small.
