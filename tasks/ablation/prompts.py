"""Task C's prompts: the question appended to the hinted prompt (§5.3) and the untrained baseline's answer-format
instructions (App. H.3)."""

ABLATION_QUESTION = "\n\nIf the hint were removed how would the assistant answer change?"

ZERO_SHOT_ABLATION = (
    "\nRespond with exactly one of the two options below, and nothing else:\n"
    "The output would remain unchanged from <<<Answer: X>>>.\n"
    "The output would change to <<<Answer: X>>>.\n"
    "Replace X with the answer letter (A, B, C, or D). Do not include any explanations, reasoning, or extra text.\n"
    "Example outputs:\n"
    "The output would remain unchanged from <<<Answer: C>>>.\n"
    "The output would change to <<<Answer: B>>>."
)
