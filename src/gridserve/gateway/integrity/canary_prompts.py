"""Canary prompts: drawn from a grammar of ordinary requests, not a short fixed list a node could learn.

A node that recognises a canary can answer it honestly and cheat on everything else. Six fixed prompts (the first
version) were a list to match against; this grammar gives over 7,000 prompts of the shapes clients send (a task about
a subject, in a framing), and each canary draws one. The grammar is public (this file), so a node could still test
a prompt against it: canaries are one check among several, and audits of real client answers, which no node can
tell from the rest, carry the weight (docs/operators.md, "What is verified, and how").
"""

import random

TASKS = (
    "Write one sentence about {s}.",
    "Explain {s} in simple words.",
    "Give me three facts about {s}.",
    "What should a beginner know about {s}?",
    "Summarise the history of {s} briefly.",
    "Write a short poem about {s}.",
    "List some common mistakes people make with {s}.",
    "How would you describe {s} to a child?",
    "What are the pros and cons of {s}?",
    "Give me a quick tip about {s}.",
    "Write a product description for {s}.",
    "Compare {s} with something similar.",
    "Why do people care about {s}?",
    "Draft a friendly email mentioning {s}.",
    "What questions should I ask about {s}?",
    "Tell me a short story that involves {s}.",
    "Write a tweet about {s}.",
    "What is the most surprising thing about {s}?",
    "Outline a plan to learn about {s}.",
    "Give an example that shows how {s} works.",
)
SUBJECTS = (
    "the sea",
    "coffee",
    "bicycles",
    "the moon",
    "gardening",
    "chess",
    "volcanoes",
    "bread baking",
    "rainforests",
    "jazz",
    "solar panels",
    "the Roman empire",
    "honeybees",
    "public libraries",
    "electric cars",
    "mountains",
    "origami",
    "the printing press",
    "penguins",
    "recycling",
    "sleep",
    "running shoes",
    "tea",
    "city parks",
    "photography",
    "the water cycle",
    "spreadsheets",
    "trains",
    "birdwatching",
    "the human heart",
    "glaciers",
    "board games",
    "the internet",
    "lighthouses",
    "knitting",
    "deserts",
    "bridges",
    "composting",
    "the violin",
    "Mars",
    "museums",
    "rice",
    "wind turbines",
    "friendship",
    "maps",
    "camping",
    "clocks",
    "rain",
    "olive oil",
    "typewriters",
    "coral reefs",
    "kites",
    "the alphabet",
    "submarines",
    "chocolate",
    "volunteering",
    "owls",
    "the stock market",
    "pottery",
    "thunderstorms",
)
FRAMINGS = ("{t}", "{t}", "{t}", "Please {l}", "Quick question: {l}", "{t} Keep it short.", "Hi! {t}", "{t} Thanks.")


def canary_prompt(rng: random.Random) -> str:
    """One prompt: a task about a subject, in a framing."""
    task = rng.choice(TASKS).format(s=rng.choice(SUBJECTS))
    return rng.choice(FRAMINGS).format(t=task, l=task[0].lower() + task[1:])


def prompt_count() -> int:
    """How many distinct prompts the grammar makes."""
    return len(set(TASKS)) * len(set(SUBJECTS)) * len(set(FRAMINGS))
