"""Conv+GroupNorm+SiLU at UNet shapes, NCHW vs channels_last, fp32 and bf16 (informs runtime/optim/memory_format.py).

Run: python3 bench/bench_channels_last.py
"""
import torch, time
torch.manual_seed(0)
res={}
for C,HW in ((128,32),(256,16),(512,8),(128,64)):
  for dt in (torch.float32, torch.bfloat16):
    conv=torch.nn.Conv2d(C,C,3,padding=1).to(dt); x=torch.randn(2,C,HW,HW,dtype=dt)
    convcl=torch.nn.Conv2d(C,C,3,padding=1).to(dt).to(memory_format=torch.channels_last); convcl.load_state_dict(conv.state_dict())
    xcl=x.to(memory_format=torch.channels_last)
    gn=torch.nn.GroupNorm(32,C).to(dt)
    def f1(): return torch.nn.functional.silu(gn(conv(x)))
    def f2(): return torch.nn.functional.silu(gn(convcl(xcl)))
    ts={1:[],2:[]}
    with torch.no_grad():
      for r in range(7):
        for k,f in ((1,f1),(2,f2)):
            t=time.perf_counter()
            for _ in range(5): f()
            ts[k].append(time.perf_counter()-t)
    m=lambda l: sorted(l)[len(l)//2]
    print(C,HW,dt, "nchw %.4f cl %.4f ratio %.2f"%(m(ts[1]),m(ts[2]),m(ts[1])/m(ts[2])))
