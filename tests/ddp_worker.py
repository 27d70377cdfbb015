"""Run by test_train.py under torchrun: DDP drafter training over gloo on CPU processes."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from vispec.testing import tiny_llava_and_processor  # noqa: E402

import vispec  # noqa: E402
from vispec.data import ShardDataset  # noqa: E402
from vispec.train import TrainConfig, train  # noqa: E402

data_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
model, _ = tiny_llava_and_processor()
drafter = vispec.EagleDrafter.from_target(model, seed=0)
res = train(model, drafter, ShardDataset(data_dir), TrainConfig(epochs=2, lr=1e-3, warmup_steps=2, log_every=1000), out,
            progress=False)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
(out / f"rank{rank}.json").write_text(json.dumps({"steps": res["steps"], "world": world,
                                                   "fc_sum": float(drafter.fc.weight.double().sum())}))
