"""The stages of facepipe's flows, one module each, named as the Prefect task that runs it in the UI.

=================  ==============================  ===========================================
UI task            module                          what it does
=================  ==============================  ===========================================
align-plan/-shard  :mod:`tasks.align`              MTCNN detection + 5-point alignment
/-finalize
lst                :mod:`tasks.lst`                aligned faces -> InsightFace ``train.lst``
pack               :mod:`tasks.pack`               ``.lst`` -> ``train.rec``/``.idx``/``property``
merge              :mod:`tasks.merge`              packed sets -> one set, de-duplicated
bins-prepare/bins  :mod:`tasks.bins`               pair lists -> verification ``.bin``
gather             :mod:`tasks.gather`             the finished data set folder
train              :mod:`tasks.train`              a training run (margin softmax or triplet)
verification       :mod:`tasks.verification`       ``.bin`` verification (10-fold protocol)
megaface           :mod:`tasks.megaface`           MegaFace identification + noise removal
export             :mod:`tasks.export`             checkpoint -> ONNX, checked against torch
=================  ==============================  ===========================================

Engines (plain functions, no Prefect; stages use them, they never use a stage):
:mod:`tasks.alignment` (detection and alignment), :mod:`tasks.training` (the trainer, its config,
objectives and run records; ``python -m tasks.training``), :mod:`tasks.evaluation` (model loading,
embedding extraction, pair and MegaFace metrics).

Shared by every stage: :mod:`tasks.runtime` (logging, progress and artifacts with or without a
Prefect run), :mod:`tasks.stage` (``stage.json`` records), :mod:`tasks.checkpoint` (the training
checkpoint format), :mod:`tasks.cli` (command lines generated from the stages' config models),
:mod:`tasks.configs` (the config models of the stages without an engine; the engines keep theirs in
``tasks.<engine>.config``; all of them import only pydantic, so a parser is built without torch or prefect).

Rules (``tests/test_layout.py``): no stage imports another stage; engines and shared modules import
no stage; only stages import prefect.
"""
