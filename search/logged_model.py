"""The MLflow model of a Pareto point, with what it needs to load.

The model is the network as one dgc operator (``dgc.program.ShippedModel``), exported by
MLflow's PyTorch flavor (pt2). torch resolves that operator when it reads the program, before
any code of the model runs, so a process must have imported ``dgc`` first. The model carries
it: the ``dgc`` package and a python_function loader (``search/dgc_pyfunc.py``) are in its
``code/`` folder, and its ``python_function`` flavor loads through that loader, which imports
dgc. ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` / ``predict`` (also in an
environment rebuilt from the model's requirements) therefore need nothing more;
``mlflow.pytorch.load_model`` needs ``import dgc`` first (its metadata, and the registered
version's description, say so).

Used as the flavor module of ``mlflow.models.Model.log``: ``save_model`` is MLflow's PyTorch
one with the python_function loader replaced.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch

LOADER = "dgc_pyfunc"
LOAD_NOTE = (
    "mlflow.pyfunc.load_model loads it as it is (its code/ folder holds dgc); "
    "mlflow.pytorch.load_model and torch.export.load need `import dgc` first (it registers "
    "the operator dgc::model_eval that the program calls)"
)


def save_model(pytorch_model: Any, path: str, mlflow_model: Any = None, **kwargs: Any) -> None:
    """MLflow's PyTorch ``save_model``, its python_function flavor loading through
    ``dgc_pyfunc`` (in the model's code/ folder)."""
    import mlflow.pytorch

    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **kwargs)
    mlflow_model.flavors["python_function"]["loader_module"] = LOADER
    mlflow_model.save(str(Path(path) / "MLmodel"))


def log_model(shipped: torch.nn.Module, signature: Any, example: Any) -> Any:
    """Log ``shipped`` to the active run as ``model``; returns MLflow's ModelInfo."""
    import dgc

    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp)
        package = Path(dgc.__file__).parent
        shutil.copytree(package, code / "dgc", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copyfile(Path(__file__).with_name(f"{LOADER}.py"), code / f"{LOADER}.py")
        return mlflow.models.Model.log(
            artifact_path=None,  # the old spelling of name, still positional in MLflow 3.17
            name="model",
            flavor=sys.modules[__name__],
            flavor_name="mlflow.pytorch",
            pytorch_model=shipped,
            code_paths=[str(code / "dgc"), str(code / f"{LOADER}.py")],
            signature=signature,
            input_example=example,
            # The program needs torch (the version it was exported with) and dgc's own
            # dependencies, which are torch's; dgc itself travels in code/.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={"load": LOAD_NOTE},
            serialization_format="pt2",
        )
