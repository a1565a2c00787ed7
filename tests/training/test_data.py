"""Labels: answer tokens + stop token of every assistant turn; prompt and audio masked."""

from __future__ import annotations

from omnivox.agent.processor import OmnivoxProcessor
from omnivox.prompts import Message, get_prompt_style
from omnivox.training.data import IGNORE_INDEX, BatchPlan, build_example, read_manifest


def _labels_text(processor, example) -> list[str]:
    spans, current = [], []
    for token, label in zip(example.input_ids.tolist(), example.labels.tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [processor.tokenizer.decode(s) for s in spans]


def test_multi_turn_labels(tiny_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder / "tokenizer")
    for style, stop in (("chatml", "<|im_end|>"), ("salmonn", "</s>")):
        processor = OmnivoxProcessor(tokenizer, get_prompt_style(style))
        messages = [Message("user", "Describe the audio.", num_audio=1), Message("assistant", "A dog barks."),
                    Message("user", "How many?"), Message("assistant", "three")]  # fmt: skip
        example = build_example(processor, messages, audio_tokens=5)
        assert int(example.audio_mask.sum()) == 5
        assert (example.labels[example.audio_mask] == IGNORE_INDEX).all()
        spans = [s.strip() for s in _labels_text(processor, example)]
        assert spans == [f"A dog barks.{stop}", f"three{stop}"]
        # the prompt before the first answer is exactly what inference feeds
        prompt = processor.tokenize(messages[:1], [5]).input_ids
        assert example.input_ids[: prompt.numel()].tolist() == prompt.tolist()
        assert (example.labels[: prompt.numel()] == IGNORE_INDEX).all()


def test_manifest_and_batch_plan(dataset):
    items = read_manifest(dataset / "train.jsonl")
    assert len(items) == 8 and items[0].path.is_file() and len(items[0].turns) == 2
    plans = [BatchPlan([len(i.audio) for i in items], 2, seed=1, rank=r, world_size=2) for r in range(2)]
    e0 = [p.epoch(0) for p in plans]
    assert len(e0[0]) == len(e0[1]) == 2
    assert sorted(i for batches in e0 for b in batches for i in b) == list(range(8))  # ranks split the items
    assert plans[0].epoch(0) == e0[0] and plans[0].epoch(1) != e0[0]  # deterministic per epoch


def test_load_split_filters_with_where_before_the_item_limit(dataset):
    from omnivox.training.data import load_split

    lows = load_split(dataset, "train", where=lambda item: item.turns[0][1] == "low")
    assert lows and all(i.turns[0][1] == "low" for i in lows)
    assert [i.audio for i in load_split(dataset, "train", max_items=2, where=lambda item: item.turns[0][1] == "low")] == [
        i.audio for i in lows[:2]
    ]
