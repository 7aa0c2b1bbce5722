"""onnxcompress tune: search pipelines of the registered passes for the best one that meets a budget.

    from onnxcompress.tune.study import tune
    result = tune("model.onnx", "latency<=0.5,metric>=0.99", "small.onnx", calibration="c.npz", validation="v.npz")
    result.best["pipeline"], result.best["values"], result.pareto

Modules: ``targets`` (the budget grammar), ``space`` (what is searched: ``option(..., search=)`` on pass fields),
``plan`` (sensitivity curves, predicted combinations,
neighbours), ``model_search`` (Optuna TPE / NSGA-II), ``trial`` (one real compress + validation + latency, staged
early stop), ``executor`` (local process pool or Ray; crash / time-out retry), ``journal`` (incremental study file,
resume), ``study`` (the driver), ``output`` (model, recipe, profile, Markdown / JSON / HTML reports), ``batch``
(manifests of many models), ``commands`` (the CLI's ``tune`` and ``batch``).
"""
