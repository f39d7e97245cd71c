# NCCL / PyTorch distributed environment for multi-GPU and multi-node runs. Source it before launching:
#   source launch/nccl_env.sh && python -m launch.run --hostfile hosts ...
# Every value can be overridden from the caller's environment (VAR=... source launch/nccl_env.sh).
# With the pdsh launcher DeepSpeed forwards only variables starting with NCCL_, PYTHON, UCX, MV2, MLFLOW to the
# other nodes; put any other one (CUDA_DEVICE_MAX_CONNECTIONS, TORCH_NCCL_*) as KEY=VALUE lines in a `.deepspeed_env`
# file in the launch directory or $HOME. The slurm launcher (srun --export=ALL) forwards everything.

# Which network interface NCCL's bootstrap and socket transport use. Matters on multi-node hosts with several NICs
# (docker0, a 1 GbE management port, the fast fabric): a wrong pick hangs at init or crawls. Leave unset on one node.
# Name a prefix of the fast interface, e.g. "ib0", "ens", or exclude with "^docker0,lo".
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^docker0,lo}"

# WARN is quiet; INFO prints the chosen transports/rings once at start, the first thing to read when a job hangs or is
# slow across nodes (look for "NET/IB" vs "NET/Socket"). NCCL_DEBUG_SUBSYS=INIT,NET narrows it.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# 1 forces TCP sockets instead of InfiniBand/RoCE. Matters only across nodes: set it to 1 on clusters without a
# working IB fabric (NCCL otherwise may try IB and hang), keep 0 where IB works (it is several times faster).
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"

# 1 makes kernels launch in issue order on one hardware queue, which Megatron-style tensor/sequence parallelism needs
# to overlap communication with compute. Plain ZeRO data parallelism does not need it; harmless to leave unset.
# export CUDA_DEVICE_MAX_CONNECTIONS=1

# A rank stuck in a collective (another rank crashed or diverged) raises instead of hanging forever: 2 (CleanUpOnly)
# makes PyTorch's NCCL watchdog abort the communicator after the process-group timeout (train.collective_timeout_s)
# and keep the process, so the error reaches Python and dsft's report (exit 87). torch 2.13's default, 3, and 1 tear
# the process down from C++ with SIGABRT instead. The engine sets the same default (finetune/watchdog.py).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-2}"
# Dump the last collectives of each rank when the watchdog fires, to see which rank stopped where.
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
# Seconds the watchdog waits for a hung NCCL heartbeat before killing the process (PyTorch default 480).
export TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC="${TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC:-600}"
