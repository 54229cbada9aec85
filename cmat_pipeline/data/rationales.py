"""Template rationales: a short chain of thought explaining a SQL statement, written from its parse tree.

The oracle teacher puts one before each action (ReAct: thought, then action); the distillation stage
uses them for action turns that arrive without a thought when no teacher endpoint is configured.

    explain_sql("SELECT COUNT(*) FROM `Games` WHERE Opponent = 'Athlone Town'", rng)
    -> "I need to count the rows of `Games` where Opponent = 'Athlone Town'."
"""

from __future__ import annotations

import random

AGGREGATE_WORDS = {"Count": "count", "Sum": "add up", "Avg": "average", "Min": "find the smallest",
                   "Max": "find the largest"}
OPENERS = ("", "To answer this, ", "Let me think about what is asked. ", "The question maps onto one query: ")


def _table(tree) -> str:
    from sqlglot import exp

    table = tree.find(exp.Table)
    return f"`{table.name}`" if table is not None else "the table"


def _where(tree) -> str:
    from sqlglot import exp

    where = tree.args.get("where") or tree.find(exp.Where)
    return f" where {where.this.sql('mysql')}" if where is not None else ""


def _explain_select(tree) -> str:
    from sqlglot import exp

    agg = next((a for a in tree.find_all(exp.AggFunc)), None)
    table, where = _table(tree), _where(tree)
    if agg is not None:
        what = AGGREGATE_WORDS.get(type(agg).__name__, type(agg).__name__.lower())
        target = "the rows" if isinstance(agg.this, exp.Star) or agg.this is None else agg.this.sql("mysql")
        if what == "count":
            return f"I need to count {'the rows' if target == 'the rows' else 'the values of ' + target} of {table}{where}."
        return f"I need to {what} {target} over the rows of {table}{where}."
    columns = ", ".join(e.sql("mysql") for e in tree.expressions)
    text = f"I need {columns} from {table}{where}"
    order = tree.args.get("order")
    if order is not None:
        text += ", " + order.sql("mysql").replace("ORDER BY", "ordered by", 1).replace(" DESC", " descending").replace(" ASC", " ascending")
    limit = tree.args.get("limit")
    if limit is not None:
        text += f", keeping the first {limit.expression.sql('mysql')}"
    return text + "."


def _explain_insert(tree) -> str:
    from sqlglot import exp

    schema = tree.this
    columns = [c.name for c in schema.expressions] if isinstance(schema, exp.Schema) else []
    values = tree.expression.find(exp.Tuple)
    cells = [v.sql("mysql") for v in values.expressions] if values is not None else []
    pairs = ", ".join(f"{c} = {v}" for c, v in zip(columns, cells)) or "the given values"
    return f"I need to insert one row into {_table(tree)} with {pairs}."


def _explain_update(tree) -> str:
    sets = ", ".join(e.sql("mysql") for e in tree.expressions)
    return f"I need to update {_table(tree)}, setting {sets}{_where(tree)}."


def _explain_delete(tree) -> str:
    return f"I need to delete the rows of {_table(tree)}{_where(tree)}."


def explain_sql(sql: str, rng: random.Random | None = None, opener: bool = True) -> str:
    """One or two sentences saying what `sql` does; `opener` may prefix a varied lead-in."""
    import sqlglot
    from sqlglot import exp

    rng = rng or random.Random(0)
    try:
        tree = sqlglot.parse_one(sql, read="mysql")
    except Exception:  # unparseable: say what we will do without pretending to understand it
        return "I will run this statement."
    explain = {exp.Select: _explain_select, exp.Insert: _explain_insert, exp.Update: _explain_update,
               exp.Delete: _explain_delete}.get(type(tree))
    body = explain(tree) if explain else "I will run this statement."
    return (rng.choice(OPENERS) if opener else "") + body
