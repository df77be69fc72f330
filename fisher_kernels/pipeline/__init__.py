"""The stages of an initialisation, each a function of the objects the one before returned:

    make_plan(model, loader, method, ...)          -> Plan        plan.py     checks, groups, who computes what
    per group of layers (executor.py: here, across ranks, whole or sharded weights)
        executor.prepare(group)                    -> prepared    the method's prepare (FILet: W's SVD side)
        collect(plan, group, prepared)             -> statistics  compute.py  one calibration pass
        executor.solve(group, statistics, ...)     -> LayerInits  the method's initialize
    write_new_adapter / write_existing_adapter     -> PeftModel   write.py    one transaction

``compute_initialization`` runs the stages up to ``solve`` (``run_stages``) and returns the
:class:`InitReport`; ``init_lora`` adds ``write``.
"""

from .compute import compute_initialization, run_stages
from ..memory import plan_layer_groups
from .plan import Plan, make_plan
from .report import InitReport
from .write import write_existing_adapter, write_new_adapter

__all__ = ["Plan", "make_plan", "plan_layer_groups", "run_stages", "compute_initialization", "InitReport",
           "write_new_adapter", "write_existing_adapter"]
