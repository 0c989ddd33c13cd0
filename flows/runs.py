"""Small helpers for flows: parameters from one pydantic model, calling tasks and subflows."""
from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ValidationError

from datasets.errors import validation_message

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])


def parameters_from(model: type[BaseModel]) -> Callable[[F], F]:
    """Give a flow function ``fn(**values)`` the parameters of ``model``: one keyword-only parameter
    per field (annotation and default from the field) and an ``Args:`` section in its docstring with
    the fields' descriptions, which Prefect shows in the UI's run form. The model is then the one
    place where a flow's parameters are written."""

    def decorate(fn: F) -> F:
        parameters, lines = [], []
        for name, field in model.model_fields.items():
            default = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=field.annotation))
            lines.append(f"    {name}: {field.description or ''}")
        fn.__signature__ = inspect.Signature(parameters, return_annotation=inspect.signature(fn).return_annotation)
        fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "\n".join(lines) + "\n"
        return fn

    return decorate


def validated(model_type: type[M], /, **values: Any) -> M:
    """``model(**values)``, with a validation failure as one ``ValueError`` line
    (:func:`datasets.errors.validation_message`) instead of pydantic's multi-line report."""
    try:
        return model_type(**values)
    except ValidationError as exc:
        raise ValueError(validation_message(exc, list(model_type.model_fields))) from None


def result_of(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a task or flow and return its result, also when it finished as a ``Skipped`` state.

    A task that returns a state (``tasks.runtime.skipped``) hands the caller that state object,
    not its data, when called plainly (measured on Prefect 3.8.8); ``return_state=True`` and
    ``State.result()`` give the data in both cases, and raise the task's exception when it failed.
    """
    state = call(*args, return_state=True, **kwargs)
    return state.result()


def make_task_runner(kind: str, max_workers: int, dask_address: str | None = None) -> TaskRunner:
    """A bounded task runner: ``"threads"``, ``"processes"`` (spawned workers, one torch each) or
    ``"dask"`` (``prefect_dask.DaskTaskRunner``: the cluster at ``dask_address``, else a local
    cluster of ``max_workers`` single-threaded worker processes)."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=max_workers)
    if kind == "processes":
        return ProcessPoolTaskRunner(max_workers=max_workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": max_workers, "threads_per_worker": 1, "processes": True})
    raise ValueError(f"task_runner {kind!r} is not one of 'threads', 'processes', 'dask'")
