"""The consumer: one torch rank (start two with torchrun). Each reads its shard of the link through
HandoffDataset, trains a small model with DDP over gloo for 2 epochs, and checks that every epoch
saw every row exactly once across the ranks."""

import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from handoff import HandoffClient
from handoff.torch import HandoffDataset

EPOCHS = 2
BATCH = int(os.environ.get("DEMO_BATCH", "2500"))


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset = HandoffDataset(batch_size=BATCH, shuffle=True, seed=42)  # link, endpoint, token: env
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(EPOCHS):
        dataset.set_epoch(epoch)
        seen, batches, rows, nbytes, loss = [], 0, 0, 0, torch.tensor(0.0)
        started = time.monotonic()
        for batch in loader:
            x, y = batch["embedding"], batch["label"].float().unsqueeze(1)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            seen.append(batch["id"])
            batches += 1
            rows += len(y)
            nbytes += x.numel() * x.element_size() + batch["id"].numel() * 8 + len(y) * 4
        seconds = time.monotonic() - started
        ids = torch.cat(seen)
        gathered = [None] * world
        dist.all_gather_object(gathered, (ids, batches))
        print(f"rank {rank} epoch {epoch}: {batches} batches, {rows:,} rows in {seconds:.2f} s "
              f"({rows / seconds:,.0f} rows/s, {nbytes / seconds / 2**20:.0f} MiB/s incl. training), "
              f"loss {loss.item():.4f}", flush=True)
        if rank == 0:
            total = HandoffClient().stats(dataset.link)["rows"]
            every = torch.cat([g[0] for g in gathered])
            counts = torch.bincount(every, minlength=total)
            equal = len({g[1] for g in gathered}) == 1
            once = bool((counts == 1).all()) and len(every) == total
            print(f"epoch {epoch}: {len(every):,} rows read of {total:,}; every row exactly once: "
                  f"{'yes' if once else 'NO'}; equal batches per rank: {'yes' if equal else 'NO'}",
                  flush=True)
            if not (once and equal):
                raise SystemExit("the epoch did not see every row exactly once")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
