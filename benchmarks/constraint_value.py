"""What a JSON-schema constraint is worth: the share of schema-valid replies of a model prompted
for JSON, without and with the constraint, over 20 varied schemas.

    python benchmarks/constraint_value.py [--model 270m] [--max-tokens 80] [--json OUT]

The model completes a raw prompt (the 270M is a base model): the schema, then a request for a
matching JSON object. Greedy decoding, the same prompt both ways. Without the constraint the
reply is read leniently: the first JSON value in it (from its first `{` or `[`), generation
stopping as soon as one is complete; with it, the whole reply must parse. Each is checked with
`jsonschema`. A reply cut off by --max-tokens counts as invalid.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema

import gemma_mlx

S = {"type": "string"}


def short(n: int = 24) -> dict:
    return {"type": "string", "minLength": 1, "maxLength": n}


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS: list[tuple[str, dict]] = [
    ("a person", obj({"name": short(), "age": {"type": "integer", "minimum": 0,
                                               "maximum": 120}})),
    ("a book", obj({"title": short(40), "author": short(), "year": {"type": "integer",
                                                                     "minimum": 1450,
                                                                     "maximum": 2030}})),
    ("a product", obj({"name": short(), "price": {"type": "number", "minimum": 0,
                                                  "maximum": 10000},
                       "currency": {"enum": ["EUR", "USD", "GBP"]}})),
    ("a city", obj({"city": short(), "country": short(), "population": {
        "type": "integer", "minimum": 0, "maximum": 40000000}})),
    ("a to-do item", obj({"task": short(40), "done": {"type": "boolean"},
                          "priority": {"enum": [1, 2, 3]}})),
    ("a colour", obj({"name": short(16), "hex": {"type": "string",
                                                 "pattern": "^#[0-9a-f]{6}$"}})),
    ("a point", obj({"x": {"type": "number", "minimum": -100, "maximum": 100},
                     "y": {"type": "number", "minimum": -100, "maximum": 100}})),
    ("a shopping list", obj({"items": {"type": "array", "items": short(16), "minItems": 1,
                                       "maxItems": 4}})),
    ("an address", obj({"street": short(32), "city": short(),
                        "postcode": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("a user account", obj({"username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,11}$"},
                            "email": {"type": "string", "format": "email", "maxLength": 40},
                            "admin": {"type": "boolean"}})),
    ("a film review", obj({"film": short(32), "stars": {"type": "integer", "minimum": 1,
                                                        "maximum": 5},
                           "verdict": {"enum": ["good", "bad", "mixed"]}})),
    ("a meeting", obj({"topic": short(32), "date": {"type": "string", "format": "date"},
                       "people": {"type": "array", "items": short(16), "maxItems": 3}})),
    ("a weather report", obj({"city": short(), "temperature_c": {
        "type": "number", "minimum": -60, "maximum": 60},
        "sky": {"enum": ["sunny", "cloudy", "rain", "snow"]}})),
    ("an order", obj({"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
                      "lines": {"type": "array", "minItems": 1, "maxItems": 3,
                                "items": obj({"sku": short(12), "qty": {
                                    "type": "integer", "minimum": 1, "maximum": 99}})}})),
    ("a company", obj({"name": short(), "ceo": obj({"name": short(), "age": {
        "type": "integer", "minimum": 18, "maximum": 100}})})),
    ("an animal", obj({"species": short(), "legs": {"type": "integer", "minimum": 0,
                                                    "maximum": 8},
                       "kind": {"const": "animal"}})),
    ("a contact", obj({"name": short(), "contact": {"anyOf": [
        obj({"phone": {"type": "string", "pattern": "^[0-9]{6,10}$"}}),
        obj({"email": {"type": "string", "format": "email", "maxLength": 40}})]}})),
    ("a team", {"$defs": {"member": obj({"name": short(), "role": short(16)})},
                **obj({"team": short(), "members": {"type": "array", "minItems": 1,
                                                    "maxItems": 3,
                                                    "items": {"$ref": "#/$defs/member"}}})}),
    ("a recipe", obj({"dish": short(), "minutes": {"type": "integer", "minimum": 1,
                                                   "maximum": 600},
                      "vegetarian": {"type": "boolean"},
                      "steps": {"type": "array", "items": short(32), "minItems": 1,
                                "maxItems": 3}})),
    ("a sensor reading", obj({"sensor": short(12), "value": {"type": "number"},
                              "unit": {"enum": ["C", "F", "K"]}, "ok": {"type": "boolean"}},
                             required=["sensor", "value", "unit"])),
]


def prompt(topic: str, schema: dict) -> str:
    return (f"JSON schema: {json.dumps(schema)}\n\nA JSON object that matches the schema "
            f"above, describing {topic}:\n")


def first_json(text: str):
    """The first JSON value in the text (from its first { or [), or raise ValueError."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        raise ValueError("no JSON in the reply")
    return json.JSONDecoder().raw_decode(text[min(starts):])[0]


def complete(text: str) -> bool:
    try:
        first_json(text)
        return True
    except ValueError:
        return False


def reply(model, text: str, constrained: bool, schema: dict, max_tokens: int) -> tuple[str, int]:
    pieces: list[str] = []
    n = 0
    extra = {"json_schema": schema} if constrained else {}
    done = (lambda: False) if constrained else (lambda: complete("".join(pieces)))
    for chunk in gemma_mlx.stream(model, text, raw=True, temp=0, max_tokens=max_tokens,
                                  should_stop=done, **extra):
        pieces.append(chunk.text)
        n = chunk.stats.generated_tokens
    return "".join(pieces), n


def valid(text: str, schema: dict, strict: bool) -> tuple[bool, str]:
    try:
        value = json.loads(text) if strict else first_json(text)
        jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
        return True, ""
    except (ValueError, jsonschema.ValidationError) as e:
        return False, str(e).splitlines()[0][:120]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="270m")
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--limit", type=int, default=len(SCHEMAS), help="first N schemas")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    model = gemma_mlx.load(args.model)
    rows = []
    for topic, schema in SCHEMAS[:args.limit]:
        row = {"topic": topic}
        for side, constrained in (("without", False), ("with", True)):
            start = time.perf_counter()
            text, n = reply(model, prompt(topic, schema), constrained, schema, args.max_tokens)
            ok, why = valid(text, schema, strict=constrained)
            row[side] = {"valid": ok, "why": why, "reply": text, "tokens": n,
                         "seconds": time.perf_counter() - start}
        rows.append(row)
        print(json.dumps({k: (v if k == "topic" else {"valid": v["valid"], "why": v["why"],
                                                       "tokens": v["tokens"]})
                          for k, v in row.items()}), flush=True)
    report = {"model": model.description, "max_tokens": args.max_tokens,
              "schemas": len(rows),
              "valid_without": sum(r["without"]["valid"] for r in rows),
              "valid_with": sum(r["with"]["valid"] for r in rows), "rows": rows}
    print(f"valid without the constraint: {report['valid_without']}/{len(rows)}, with it: "
          f"{report['valid_with']}/{len(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return report


if __name__ == "__main__":
    main()
