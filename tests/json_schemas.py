"""Hypothesis strategies for JSON schemas whose every instance is finite (so an answer under one ends by itself), and
for instances of them (hypothesis-jsonschema 0.23 does not run on the pinned hypothesis)."""

from typing import Any

from hypothesis import strategies as st

leaves = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(
        lambda a, b: {"type": "integer", "minimum": min(a, b), "maximum": max(a, b)},
        st.integers(-99, 99),
        st.integers(-99, 99),
    ),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text("abcxyz", min_size=1, max_size=4), min_size=1, max_size=3, unique=True).map(lambda e: {"enum": e}),
)


def objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def build(props: dict[str, dict[str, Any]], required: list[bool]) -> dict[str, Any]:
        names = sorted(props)
        return {
            "type": "object",
            "properties": props,
            "required": [n for n, r in zip(names, required, strict=False) if r],
            "additionalProperties": False,
        }

    return st.builds(
        build,
        st.dictionaries(st.text("abcdefgh", min_size=1, max_size=5), children, min_size=1, max_size=3),
        st.lists(st.booleans(), min_size=3, max_size=3),
    )


bounded_schemas = st.recursive(
    leaves,
    lambda inner: st.one_of(
        objects(inner),
        st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, inner, st.integers(0, 3)),
    ),
    max_leaves=6,
).filter(lambda s: s.get("type") == "object")


def instances(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid under one of `bounded_schemas` (hypothesis-jsonschema 0.23 does not run on this hypothesis)."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema["type"]
    if kind == "string":
        return st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=schema["maxLength"])
    if kind == "integer":
        return st.integers(schema["minimum"], schema["maximum"])
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(instances(schema["items"]), max_size=schema["maxItems"])
    required = set(schema["required"])
    chosen = st.fixed_dictionaries(
        {k: instances(v) for k, v in schema["properties"].items() if k in required},
        optional={k: instances(v) for k, v in schema["properties"].items() if k not in required},
    )
    return chosen.map(lambda d: {k: d[k] for k in schema["properties"] if k in d})  # the schema's order
