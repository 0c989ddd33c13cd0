"""One rank of the 2-process gloo check in test_models_partial_fc.py (run as a script, not collected).

Usage: python partial_fc_worker.py RANK WORLD_SIZE PORT DATA.pt OUT.pt
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from models.margins import get_margin
from models.partial_fc import PartialFC, gather_shards


def main(rank: int, world: int, port: int, data_path: str, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    data = torch.load(data_path)
    embeddings, labels, weight, bias = data["embeddings"], data["labels"], data["weight"], data["bias"]
    num_classes, emb_size = weight.shape
    start = sum(data["sizes"][:rank])
    rows = slice(start, start + data["sizes"][rank])
    results: dict = {}
    for name in data["heads"]:
        head = get_margin(name).train()
        pfc = PartialFC(head, emb_size, num_classes)
        pfc.load_full_weight(weight, None if head.normalized else bias)
        local = embeddings[rows].clone().requires_grad_()
        loss = pfc(local, labels[rows])
        loss.backward()
        results[name] = {
            "loss": loss.detach(), "embedding_grad": local.grad, "shard": (pfc.start, pfc.stop),
            "weight_grad": gather_shards(pfc.weight.grad, num_classes),
            "bias_grad": None if pfc.bias is None else gather_shards(pfc.bias.grad, num_classes),
            "full_weight": pfc.full_weight(),
        }
    pfc = PartialFC(get_margin("arcface"), emb_size, num_classes, sample_rate=data["sample_rate"],
                    generator=torch.Generator().manual_seed(100 + rank))
    pfc.load_full_weight(weight)
    local = embeddings[rows].clone().requires_grad_()
    loss = pfc(local, labels[rows])
    loss.backward()
    index = pfc.last_sample_index
    sampled = torch.zeros(num_classes, dtype=torch.bool)
    sampled[pfc.start + index] = True
    dist.all_reduce(sampled_int := sampled.int(), op=dist.ReduceOp.SUM)
    results["sampled"] = {"loss": loss.detach(), "embedding_grad": local.grad, "classes": sampled_int.bool(),
                          "count": int(index.numel()), "weight_grad": gather_shards(pfc.weight.grad, num_classes)}
    torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
