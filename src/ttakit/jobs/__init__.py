"""Jobs: each takes a checkpoint (or predictors), data and policies, returns results and writes
its outputs atomically. One module per job; the CLI calls exactly one of them per command.

===============  ================================================================================
``train``        :func:`~ttakit.jobs.train.train_run`: data, training, a self-describing checkpoint
``evaluate``     :func:`~ttakit.jobs.evaluate.evaluate_checkpoint`, with repeats and conformal extras
``search``       :func:`~ttakit.jobs.search.search_checkpoint`: a policy searched on held-out rows
``demo``         :func:`~ttakit.jobs.demo.run_demo`: the classic experiment end to end
``predict``      :func:`~ttakit.jobs.predict.predict_images`: a folder of files, resumable
``export``       :func:`~ttakit.jobs.export.export_checkpoint`: ONNX, torch.export, TorchScript
``audit``        :func:`~ttakit.jobs.audit.audit_checkpoint`: label issues, review page, clean copy
``audit_apply``  :func:`~ttakit.jobs.audit_apply.apply_decisions`: the review's decisions applied
``ensemble``     :func:`~ttakit.jobs.ensemble.ensemble_checkpoints`: several checkpoints voting
``lr_find``      :func:`~ttakit.jobs.lr_find.run_lr_find`: the range test on a data set, with its plot
===============  ================================================================================

Private modules (``_policies``, ``_eval_data``, ...) hold what several jobs share.
"""
