"""How a script is started: plainly, or on several processes through PyTorch's launcher (torchrun). No torch
import here, so that run_pipeline.py starts without it."""


def launcher(python: str, nproc: int) -> list[str]:
    """The command prefix that runs a script on `nproc` processes with torchrun, or plainly for one process."""
    if nproc <= 1:
        return [python]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
