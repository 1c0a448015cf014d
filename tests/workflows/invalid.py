"""Two workflows with definition errors, for the tests of workers that must refuse to
start (``LEASEFLOW_WORKFLOWS=tests.workflows.invalid``). Import it only in a subprocess,
or unregister both: they are registered on import."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from leaseflow import Complete, Workflow


class Empty(BaseModel):
    pass


#: A typo in ``to=``: ``sceond`` is no state.
typo = Workflow("typo_in_to", context=Empty)


@typo.state(initial=True, to=["sceond"])
def first(ctx: Any) -> str:
    return "second"


@typo.state()
def second(ctx: Any) -> Complete:
    return Complete()


#: No state is marked ``initial=True``.
no_initial = Workflow("no_initial", context=Empty)


@no_initial.state(to=["done"])
def begin(ctx: Any) -> str:
    return "done"


@no_initial.state()
def done(ctx: Any) -> Complete:
    return Complete()
