"""Tiny task files in every supported format, laid out like shared/data (for tests without real data)."""

from __future__ import annotations

import bz2
import json
from pathlib import Path


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


HELLASWAG_ORIG = [
    {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": "3"},
    {"activity_label": "Making a cake", "ctx_a": "[header] How to bake a cake [title] Mix the flour.", "ctx_b": "",
     "endings": ["[step] Pour it  in a pan.", "Eat it.", "Sing.", "Sleep."], "label": 0},
]
# the llama.cpp derived text of the same two items: ctx_a + " " + ctx_b joined, ctx_b NOT capitalized
HELLASWAG_TXT = ("Roof shingle removal: A man is sitting on a roof. he\n3\nis using wrap to wrap a pair of skis.\n"
                 "is ripping level tiles off.\nis holding a rubik's cube.\nstarts pulling up roofing on a roof.\n"
                 "Making a cake: How to bake a cake. Mix the flour.\n0\nPour it in a pan.\nEat it.\nSing.\nSleep.\n")


def write_task_data(root: Path, hellaswag: str = "both") -> Path:
    """Write 2-3 items per task under root; hellaswag: "jsonl", "txt" or "both"."""
    root = Path(root)
    if hellaswag in ("jsonl", "both"):
        _jsonl(root / "hellaswag/hellaswag_val.jsonl", HELLASWAG_ORIG)
    if hellaswag in ("txt", "both"):
        (root / "hellaswag").mkdir(parents=True, exist_ok=True)
        (root / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(HELLASWAG_TXT.encode()))
    _jsonl(root / "piqa/valid.jsonl", [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid."},
                                       {"goal": "Dry hair", "sol1": "Use water.", "sol2": "Use a towel."}])
    (root / "piqa/valid-labels.lst").write_text("0\n1\n")
    _jsonl(root / "winogrande/dev.jsonl", [
        {"qID": "a", "sentence": "Sarah was a better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"qID": "b", "sentence": "The cup fell off the table because _ was slippery.",
         "option1": "the cup", "option2": "the table", "answer": "1"}])
    arc = [{"id": "q1", "question": {"stem": "Which is a planet?", "choices": [
        {"text": "Mars", "label": "A"}, {"text": "Moon", "label": "B"}, {"text": "Sun", "label": "C"}]},
        "answerKey": "A"},
        {"id": "q2", "question": {"stem": "How many legs has a spider?", "choices": [
            {"text": "six", "label": "1"}, {"text": "eight", "label": "2"}, {"text": "ten", "label": "3"},
            {"text": "four", "label": "4"}]}, "answerKey": "2"}]
    _jsonl(root / "arc/ARC-Easy-Test.jsonl", arc)
    _jsonl(root / "arc/ARC-Challenge-Test.jsonl", arc[::-1])
    _jsonl(root / "boolq/val.jsonl", [
        {"question": "is the sky blue", "passage": "Sky -- The sky is blue on clear days.", "label": "true", "idx": 0},
        {"question": "is fire cold", "passage": "Fire -- Fire is hot.", "label": False, "idx": 1}])
    (root / "openbookqa").mkdir(parents=True, exist_ok=True)
    (root / "openbookqa/test.tsv").write_text(
        "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"
        "7-1\tThe sun is a\t(A) planet (B) star (C) moon (D) comet\tThe sun is a (A) planet (B) star\tB\n"
        "7-2\tWater freezes at\t(A) 0 C (B) 50 C (C) 100 C (D) 30 C\tWater freezes at ...\tA\n")
    _jsonl(root / "lambada/lambada_test.jsonl", [
        {"text": "He opened the door and saw his old friend standing there. \"Hello,\" said his friend"},
        {"text": "The cat sat on the mat"}])
    (root / "sciq").mkdir(parents=True, exist_ok=True)
    _jsonl(root / "sciq/sciq_validation.jsonl", [
        {"question": "What gas do plants absorb?", "distractor1": "oxygen", "distractor2": "helium",
         "distractor3": "neon", "correct_answer": "carbon dioxide", "support": " Plants absorb carbon dioxide."},
        {"question": "Who proposed evolution?", "distractor1": "Linnaeus", "distractor2": "shaw",
         "distractor3": "Scopes", "correct_answer": "darwin", "support": ""}])
    _jsonl(root / "copa/val.jsonl", [
        {"premise": "The man turned on the faucet.", "choice1": "The toilet filled with water.",
         "choice2": "Water flowed from the spout.", "question": "effect", "label": 1, "idx": 0},
        {"premise": "The girl found a bug in her cereal.", "choice1": "She poured milk in the bowl.",
         "choice2": "She lost her appetite.", "question": "effect", "label": 1, "idx": 1}])
    (root / "mmlu/test").mkdir(parents=True, exist_ok=True)
    (root / "mmlu/test/high_school_physics_test.csv").write_text(
        'What is the unit of force?,joule,newton,watt,pascal,B\n"Speed of light, roughly?",3e8 m/s,3e5 m/s,340 m/s,1 m/s,A\n')
    (root / "wikitext-2-raw").mkdir(parents=True, exist_ok=True)
    (root / "wikitext-2-raw/wiki.test.raw").write_text(
        " \n = Title = \n \n The model prunes heads and neurons . \n The teacher distills knowledge . \n \n"
        " = = Section = = \n \n Small fast python code runs on cpu and gpu . \n" * 8)
    return root
