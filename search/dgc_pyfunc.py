"""The python_function loader of the MLflow models that dgc-search logs.

Shipped in each model's ``code/`` folder next to the ``dgc`` package, which MLflow puts on
``sys.path`` before it imports this module: ``mlflow.pyfunc.load_model`` and ``mlflow models
serve`` / ``predict`` then need no ``import dgc`` by the user and no dgc installed. The model
is the network as one dgc operator (``dgc::model_eval``), which ``import dgc`` registers with
torch; then MLflow's PyTorch loader reads it.
"""

from __future__ import annotations

from typing import Any


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> Any:
    try:
        import dgc  # noqa: F401  (registers torch.ops.dgc.*, which the program calls)
    except ImportError as err:
        raise ImportError(
            "this MLflow model runs dgc's operator dgc::model_eval: `import dgc` failed "
            f"({err}); the dgc package ships in the model's code/ folder, and needs torch"
        ) from err
    from mlflow.pytorch import _load_pyfunc as load

    return load(path, model_config)
