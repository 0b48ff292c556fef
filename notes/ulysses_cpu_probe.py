# Probe for issue 6 (not a test): diffusers Ulysses context parallelism on CPU with gloo, 2 processes,
# tiny Wan, compiled with adaspa (default) or BK=aot_eager. Run: python notes/ulysses_cpu_probe.py
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
def main(rank, world):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from diffusers import ContextParallelConfig
    from tests.tiny_models import tiny_wan
    import adaspa_compile
    m, kw = tiny_wan()
    with torch.no_grad():
        ref = m(**kw)[0]
    torch.accelerator.device_count = lambda: 1  # diffusers assumes an accelerator
    m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    with torch.no_grad():
        cp_eager = m(**kw)[0]
    if rank == 0:
        print("CP eager vs single-process", (cp_eager - ref).abs().max().item(), ref.abs().max().item())
    c = torch.compile(m, backend=os.environ.get("BK","adaspa"), fullgraph=False, **({} if os.environ.get("BK") else {"options": {"min_seq_len":64, "search_steps":(1,2), "inner_backend":"aot_eager"}}))
    with torch.no_grad():
        outs=[]
        for i in range(4):
            a = dict(kw, timestep=torch.full_like(kw["timestep"], 900-100*i))
            outs.append(c(**a)[0])
    if rank == 0:
        print("CP adaspa dense step vs CP eager", (outs[0]-cp_eager).abs().max().item())
        print(adaspa_compile.report())
    dist.destroy_process_group()
if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(main, args=(2,), nprocs=2)
