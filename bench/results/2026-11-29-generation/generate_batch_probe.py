import json, time, sys, torch
sys.path.insert(0, "/work/main")
from posttrain.model.loading import load_model, load_tokenizer
from transformers import GenerationConfig
P = "/tmp/real_run/data/processed/"
prompts = []
for s in ["eval_cot", "eval_instruction", "eval_harmful", "eval_benign"]:
    prompts += [json.loads(l)["prompt"] for l in open(P + s + ".jsonl")][:10]
model = load_model("/tmp/real_run/models/base", ); tok = load_tokenizer("/tmp/real_run/models/base")
model.eval()
ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
ids = [x["input_ids"] if not isinstance(x, list) else x for x in ids]
gc = GenerationConfig(max_new_tokens=64, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      max_batch_tokens=512)
t = time.perf_counter()
try:
    res = model.generate_batch(inputs=ids, generation_config=gc, progress_bar=False)
except Exception as e:
    print("FAILED", repr(e)[:800]); raise SystemExit
dt = time.perf_counter() - t
n = sum(len(r.generated_tokens) for r in res.values())
print(f"generate_batch: {dt:.1f}s {n} tokens {n/dt:.1f} tok/s")
