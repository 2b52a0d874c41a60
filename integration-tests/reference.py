"""transformers as the reference the served model is compared with."""

from __future__ import annotations

from pathlib import Path


def greedy_continuations(model_dir: Path, prompts: list[str], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of every prompt in float32, ending at EOS if any."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        # NOTE: an explicit mask; else generate masks prompt tokens equal to the pad id.
        with torch.no_grad():
            generated = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                do_sample=False,
            )
        outputs.append(generated[0, input_ids.shape[1] :].tolist())
    return outputs
