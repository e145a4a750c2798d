"""Sharded analysis with torch.distributed: each process analyses its share, one all-reduce.

Run on one machine with two processes (gloo, CPU):

    torchrun --standalone --nproc_per_node=2 sharded_torch.py

Run plainly (``python sharded_torch.py``) it launches itself that way.  On several machines
use torchrun's ``--nnodes``/``--rdzv-endpoint`` options and the NCCL backend on GPUs.  Rank 0
checks the result against one single-process analysis of all the data and prints the
largest relative deviation.
"""

import os
import subprocess
import sys

import numpy as np
import torch
import torch.distributed as dist

import fishercore as fc
from fishercore.backends import torch as fc_torch

if "LOCAL_RANK" not in os.environ:  # not started by torchrun: start two processes with it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    sys.exit(subprocess.run(cmd).returncode)

dist.init_process_group("gloo")  # "nccl" on GPUs; torchrun sets rank, world size and address
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)  # every rank builds the same model and data set
net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                          torch.nn.Linear(32, 5)).double()
model = fc_torch.from_sequential(net)
X = torch.randn(1001, 20, dtype=torch.float64)

share = np.array_split(np.arange(X.shape[0]), world)[rank]  # uneven shares are fine
local = fc.analyze(model, X[share], "categorical")
result = fc_torch.all_reduce(local)  # every rank now holds the analysis of all 1,001 inputs

if rank == 0:
    single = fc.analyze(model, X, "categorical")
    dev = max(float((getattr(result, f) - getattr(single, f)).abs().max() / getattr(single, f).abs().max())
              for f in ("fisher", "v1", "v2", "c12", "var_x", "v1_lower", "v1_upper", "v2_lower", "v2_upper"))
    print(f"{world} processes, {result.n_inputs} inputs; largest deviation from one process: {dev:.1e}")
    assert result.n_inputs == X.shape[0] and dev <= 1e-12
dist.destroy_process_group()
