"""A tiny random Llama with a locally trained byte-level BPE tokenizer and a chat template.

Real enough for the real code paths (tokenizer, chat template, generate, peft, TRL), small
enough for fast tests; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Hi, do you renovate kitchens? Yes we do, how big is your kitchen?",
    "What is the price of the blue sofa? It costs 900 dollars and ships in a week.",
    "Can we book a visit on Thursday at 10am? Thursday works, see you then.",
    "I am not sure yet, I will think about it. Sure, take your time!",
    "We offer a free quote and a ten year warranty on all work.",
    "Thanks for your message, our team will get back to you soon.",
]


def build_tiny_model(directory: Path, *, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(str(directory))
    return directory


# What a published base model's generation_config.json may say. generate() (and vLLM, unless
# told otherwise) merges it into every sampling option a call leaves unset.
OPINIONATED_GENERATION: dict[str, object] = {
    "do_sample": True,
    "temperature": 0.3,
    "top_k": 5,
    "min_p": 0.05,
    "typical_p": 0.9,
    "repetition_penalty": 1.3,
    "no_repeat_ngram_size": 2,
}


def with_generation_config(model_dir: Path, directory: Path, **settings: object) -> Path:
    """A copy of model_dir whose generation_config.json also says `settings`, as a published
    base model's may (a repetition penalty, top_k, min_p, ...)."""
    import shutil

    from transformers import GenerationConfig

    shutil.copytree(model_dir, directory)
    generation = GenerationConfig.from_pretrained(str(model_dir))
    generation.update(**settings)
    generation.save_pretrained(str(directory))
    return directory
