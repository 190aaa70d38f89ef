"""Phase timer for bench/lifecycle_time.py: loaded by every Python process of a timed `dvc repro`.

bench/lifecycle_time.py puts this folder on PYTHONPATH and sets LIFECYCLE_TIMING=<file>; anywhere else this
file is never imported, and with the variable unset it does nothing. It wraps (never replaces) a few functions
as their modules are imported and, at exit, appends one JSON line per process to the file: its argv, wall
time and the self time spent in each phase:

  imports      executing modules on import (torch, transformers, trl, mlflow, ... and the stages)
  config       posttrain.core.config.load_config
  mlflow       posttrain.core.tracking (stage runs, metrics, model artifacts) and transformers' MLflowCallback
  model_io     posttrain.model.loading: loading models/tokenizers (adapter chains merged) and saving them
  checkpoints  Trainer._save_checkpoint (crash safety)
  train        Trainer.train, less the nested phases above
  eval         Trainer.evaluate
  generate     posttrain.evaluation.scoring.generate / sample and posttrain.model.reward_model.reward_scores
               (suites, policy pairs, rft samples, the teacher's answers, the judge)
Time in none of them (data handling, perplexity, other scoring) is the stage's other compute.
"""

import os

if os.environ.get("LIFECYCLE_TIMING"):
    import atexit
    import contextlib
    import functools
    import importlib.machinery
    import json
    import sys
    import time

    _START = time.perf_counter()
    _TOTALS: dict = {}
    _STACK: list = []  # [phase, start, time in nested timed calls]

    def _enter(phase):
        _STACK.append([phase, time.perf_counter(), 0.0])

    def _exit():
        phase, start, nested = _STACK.pop()
        spent = time.perf_counter() - start
        _TOTALS[phase] = _TOTALS.get(phase, 0.0) + spent - nested
        if _STACK:
            _STACK[-1][2] += spent

    def _timed(phase, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _enter(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                _exit()
        return wrapper

    def _timed_cm(phase, fn):
        """A context manager whose set-up and tear-down count as `phase`, its body not."""
        @functools.wraps(fn)
        @contextlib.contextmanager
        def wrapper(*args, **kwargs):
            _enter(phase)
            try:
                cm = fn(*args, **kwargs)
                value = cm.__enter__()
            finally:
                _exit()
            try:
                yield value
            except BaseException:
                _enter(phase)
                try:
                    if not cm.__exit__(*sys.exc_info()):
                        raise
                finally:
                    _exit()
            else:
                _enter(phase)
                try:
                    cm.__exit__(None, None, None)
                finally:
                    _exit()
        return wrapper

    _PATCHES = {
        "posttrain.core.config": [("load_config", "config", _timed)],
        "posttrain.core.tracking": [("stage_run", "mlflow", _timed_cm), ("log_stage_metrics", "mlflow", _timed),
                            ("log_model_dir", "mlflow", _timed), ("lifecycle_run", "mlflow", _timed)],
        "posttrain.evaluation.scoring": [(n, "generate", _timed) for n in ("generate", "sample")],
        "posttrain.model.reward_model": [("reward_scores", "generate", _timed)],
        "posttrain.model.loading": [(n, "model_io", _timed) for n in ("load_model", "load_tokenizer",
                                                                     "load_for_training", "save_model")],
    }
    _CLASS_PATCHES = {
        "transformers.trainer": ("Trainer", [("train", "train"), ("_save_checkpoint", "checkpoints"),
                                             ("evaluate", "eval")]),
        "transformers.integrations.integration_utils": (
            "MLflowCallback", [(n, "mlflow") for n in ("setup", "on_train_begin", "on_log", "on_train_end",
                                                       "on_save")]),
    }

    def _patch(module):
        for name, phase, wrap in _PATCHES.get(module.__name__, []):
            if hasattr(module, name):
                setattr(module, name, wrap(phase, getattr(module, name)))
        cls_name, methods = _CLASS_PATCHES.get(module.__name__, (None, []))
        cls = getattr(module, cls_name, None) if cls_name else None
        for name, phase in methods:
            if cls is not None and name in vars(cls):
                setattr(cls, name, _timed(phase, vars(cls)[name]))

    _LOADERS = (importlib.machinery.SourceFileLoader, importlib.machinery.SourcelessFileLoader,
                importlib.machinery.ExtensionFileLoader)

    class _Finder:
        """Times each module's execution on import, and patches the modules above once they have run."""

        def find_spec(self, name, path, target=None):
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            loader = spec.loader
            if isinstance(loader, _LOADERS) and "exec_module" not in vars(loader):
                original = loader.exec_module

                def exec_module(module, _original=original):
                    _enter("imports")
                    try:
                        _original(module)
                    finally:
                        _exit()
                    _patch(module)

                loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())

    @atexit.register
    def _report():
        record = {"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv, "start": time.time() - (
            time.perf_counter() - _START), "wall_s": time.perf_counter() - _START, "phases": _TOTALS}
        with open(os.environ["LIFECYCLE_TIMING"], "a") as f:
            f.write(json.dumps(record) + "\n")
