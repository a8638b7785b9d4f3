"""Hand timing of single steps and of decoding (no optimizer schedule, no data loader): median of 3
steps after one warm-up, on the first 64 paraphrase training pairs in file order (so batches are
padded to their longest pair, unlike postlab's length-grouped batches).

    .venv/bin/python bench/step_times.py

Prints: sampling speed (12 sonnet prompts x 40 new tokens), a full fine-tuning step, and LoRA r=8
steps with dropout 0.05 and 0.0.
"""
import time, torch, sys
from postlab.models import load_lm
from postlab.config import GenerationConfig, TaskConfig, ParameterizationConfig, LoraConfig
from postlab.generate import generate
from postlab.tasks import get_task
from postlab.data import tokenize, score_batch
from postlab.logprobs import score
from postlab.parameterization import apply_parameterization
lm = load_lm("smollm2-135m")
t = get_task(TaskConfig(name="sonnets"))
prompts = [e.prompt for e in t.train_examples()[:12]]
for mnt in (40,):
    g = GenerationConfig(temperature=1.0, top_p=0.9, max_new_tokens=mnt, seed=0, batch_size=12)
    generate(lm, prompts[:2], GenerationConfig(max_new_tokens=4, seed=0))
    t0=time.perf_counter(); out=generate(lm, prompts, g, desc=None); dt=time.perf_counter()-t0
    print(f"generate 12 x {mnt}: {dt:.2f}s = {dt/mnt*1000:.0f} ms/step", flush=True)
pt = get_task(TaskConfig(name="paraphrase", train="../shared/data/quora/quora-train.tsv", train_limit=64))
items,_ = tokenize(pt.train_examples(), lm.tokenizer, 512, append_eos=False)
def steps(model_lm, n=3):
    opt = torch.optim.AdamW([p for p in model_lm.model.parameters() if p.requires_grad], lr=1e-6)
    ts=[]
    for s in range(n+1):
        b = score_batch(items[16*s:16*s+16], lm.tokenizer.pad_token_id)
        t0=time.perf_counter()
        lp, m = score(model_lm, b); loss = -(lp*m).sum()/m.sum(); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        ts.append(time.perf_counter()-t0)
    return sorted(ts[1:])[len(ts[1:])//2]
print("fft step", steps(lm), flush=True)
for d in (0.05, 0.0):
    l2 = load_lm("smollm2-135m")
    l2.model = apply_parameterization(l2.model, ParameterizationConfig(method="lora", lora=LoraConfig(r=8, dropout=d)))
    print("lora dropout", d, "step", steps(l2), flush=True)
