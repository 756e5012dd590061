"""IFEval-style instruction following with lm-eval's own instructions and checkers.

IFEval's 541 prompts live on the Hugging Face hub, which these machines cannot reach, but its
verifiable instructions and their checkers ship in the `lm-eval` wheel. So the built-in `ifeval`
suite appends one of those instructions, with arguments drawn by lm-eval's own
`build_description` under a fixed seed, to each held-out ShareGPT prompt (a distribution no
method trains on), and scores answers with lm-eval's strict checker. Rows have IFEval's own
format (`key`, `prompt`, `instruction_id_list`, `kwargs`), so the real IFEval file works too
(`ifeval:PATH`).

Left out, so that the suite sees the loss of instruction following and not its absence:
  - constraints a bare one-word answer meets (`less than` N words or letters, no commas, forbidden
    words, all lowercase): a model that stopped writing would pass them;
  - sentence counting and capital-word frequency: their checkers need NLTK's punkt data, which
    no package registry serves;
  - answering in another language: beyond a 135M English model, so it only adds items at the floor.
"""
import contextlib
import io
import random

# Instruction ids used, with the arguments fixed here (None: lm-eval draws them).
INSTRUCTIONS = {
    "keywords:existence": {},
    "keywords:frequency": {"relation": "at least"},
    "keywords:letter_frequency": {"let_relation": "at least"},
    "length_constraints:number_words": {"relation": "at least"},
    "length_constraints:number_paragraphs": {},
    "detectable_content:number_placeholders": {},
    "detectable_content:postscript": {},
    "detectable_format:number_bullet_lists": {},
    "detectable_format:constrained_response": {},
    "detectable_format:number_highlighted_sections": {},
    "detectable_format:multiple_sections": {},
    "detectable_format:json_format": {},
    "detectable_format:title": {},
    "combination:two_responses": {},
    "combination:repeat_prompt": {},
    "startend:end_checker": {},
    "change_case:english_capital": {},
    "startend:quotation": {},
}
# Word counts a small chat model writes (lm-eval draws 100-500).
NUM_WORDS = (25, 50, 75, 100)
SEED = 2602


def registry():
    """lm-eval's instruction registry. Importing it asks NLTK to download punkt, which fails offline
    with a few lines of noise: kept off the terminal (the checkers used here never need punkt)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from lm_eval.tasks.ifeval import instructions_registry
    return instructions_registry.INSTRUCTION_DICT


def library_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm-eval")


def build_items(prompts: list[str]) -> list[dict]:
    """One instruction per prompt, cycling through INSTRUCTIONS in a seeded order."""
    classes = registry()
    rng = random.Random(SEED)
    ids = list(INSTRUCTIONS)
    rows = []
    for key, prompt in enumerate(prompts):
        if key % len(ids) == 0:
            rng.shuffle(ids)
        instruction_id = ids[key % len(ids)]
        args = dict(INSTRUCTIONS[instruction_id])
        if instruction_id == "length_constraints:number_words":
            args["num_words"] = rng.choice(NUM_WORDS)
        if instruction_id == "combination:repeat_prompt":
            args["prompt_to_repeat"] = prompt
        random.seed(rng.randrange(2**32))  # lm-eval draws its arguments from the module-level generator
        instruction = classes[instruction_id](instruction_id)
        description = instruction.build_description(**args)
        kwargs = instruction.get_instruction_args() or {}
        ending = "" if prompt.endswith((".", "?", "!")) else "."
        rows.append({"key": key, "prompt": f"{prompt}{ending} {description}", "instruction_id_list": [instruction_id],
                     "kwargs": [kwargs]})
    return rows


def row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "each line must be a JSON object"
    if not (isinstance(row.get("prompt"), str) and isinstance(row.get("instruction_id_list"), list)
            and isinstance(row.get("kwargs"), list) and len(row["kwargs"]) == len(row["instruction_id_list"])):
        return "needs prompt, instruction_id_list and kwargs (one per instruction), as in IFEval"
    unknown = [i for i in row["instruction_id_list"] if i not in registry()]
    if unknown:
        return f"unknown IFEval instruction(s) {', '.join(unknown)}"
    return None


def follows(row: dict, response: str) -> list[bool]:
    """lm-eval's strict IFEval check: whether `response` follows each of the row's instructions."""
    registry()
    from lm_eval.tasks.ifeval.utils import InputExample, test_instruction_following_strict

    example = InputExample(key=row.get("key", 0), instruction_id_list=row["instruction_id_list"],
                           prompt=row["prompt"], kwargs=row["kwargs"])
    return list(test_instruction_following_strict(example, response).follow_instruction_list)
