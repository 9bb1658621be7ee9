"""Task B's prompts: the paper's five patching templates (§4.5), the untrained baseline's prompt (App. H.2), and the
phrases the '- layer' and '- token' prompt omissions remove (§4.8)."""

import re

PATCHING_TEMPLATES = (
    "If feature {feature} at layer {layer} is added to tokens {tokens} when processing the text <<<{input}>>>, how would the output change?",
    "When feature {feature} at layer {layer} is added at tokens {tokens} in the input <<<{input}>>>, what happens to the model's output?",
    "Consider the input text: <<<{input}>>>. If we steer layer {layer} towards feature {feature} at tokens {tokens}, how does this affect the generated continuation?",
    "Given the text <<<{input}>>>, what would be the effect on the output if feature {feature} at layer {layer} is added to tokens {tokens}?",
    "If we steer towards feature {feature} at layer {layer} and tokens {tokens} when processing <<<{input}>>>, how would the model's response differ?",
)  # fmt: skip

# The untrained baseline: the question, then the paper's answer-format instructions (App. H.2).
ZERO_SHOT_PATCHING = (
    "If feature {feature} at layer {layer} is inserted into token {tokens} when processing the text <<<{input}>>>, "
    "how would the output change?\n"
    "Respond with exactly one of the two options below, and nothing else:\n"
    "The output would remain unchanged from <<<X>>>.\n"
    "The output would change to <<<X>>>.\n"
    "Replace X with the next token of the answer following the input. Make sure X is a *single* next token.\n"
    "Example Outputs:\n"
    "The output would remain unchanged from <<<Paris>>>.\n"
    "The output would change to <<<doctor>>>.\n"
    "The output would remain unchanged from <<<Apple>>>.\n"
    "The output would change to <<<unknown>>>."
)
# The phrases that carry the layer and the token in the five templates ("at layer {layer}", "steer layer {layer}
# towards", "to / at / and tokens {tokens}"); removing them leaves a grammatical question.
DROP = {
    "no_layer": re.compile(r" (?:at )?layer \{layer\}"),
    "no_token": re.compile(r" (?:to |at |and )?tokens \{tokens\}"),
}
