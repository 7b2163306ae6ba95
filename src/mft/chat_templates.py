"""Chat templates by name (`chat_template_name` in training configs)."""

# The `tulu` format of the published MFT runs:
#   <|user|>\n{user}\n<|assistant|>\n{assistant}</s>\n
# (each turn ends with a newline; an assistant turn ends with EOS; the last assistant turn has no newline).
TULU = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + eos_token }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{% endfor %}"
)

TEMPLATES = {"tulu": TULU}
