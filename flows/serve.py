"""Serve both deployments from this process: ``build-dataset/default`` and ``train-and-eval/default``.

    python -m flows.serve            # what ``python -m flows.local up`` starts in the background

The process registers the deployments with the API at ``PREFECT_API_URL`` and runs their flow runs
as child processes until it is stopped (SIGTERM/Ctrl-C). On many machines use ``prefect.yaml``'s
work pools and ``prefect worker start`` instead.
"""
from __future__ import annotations

from prefect import serve

from flows.build_dataset import build_dataset
from flows.train_and_eval import train_and_eval

DEPLOYMENT = "default"


def main() -> None:
    serve(
        build_dataset.to_deployment(name=DEPLOYMENT, description="photos or aligned faces -> InsightFace training set",
                                    tags=["facepipe"]),
        train_and_eval.to_deployment(name=DEPLOYMENT, description="train, evaluate and export a face-recognition model",
                                     tags=["facepipe"]),
    )


if __name__ == "__main__":
    main()
