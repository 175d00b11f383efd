"""Write ``customers.csv``, a made-up customer table for ``configs/data/tabular_example.yaml``.

Deterministic (fixed seed), so re-running it rewrites the same file::

    python mtl_lightning/data/examples/make_customers.py [--rows 1000] [--out PATH]

Columns: ``id`` (an identifier, dropped by the config), numeric features ``age``, ``tenure_months``,
``monthly_visits``, ``avg_basket`` (euros), ``support_tickets``, ``discount_rate``, categorical features
``region`` (4 values) and ``device`` (3 values), and three targets that depend on the features, so a model can
learn them:

- ``churned`` (binary 0/1): more likely with short tenure, many support tickets and few visits.
- ``plan`` (multiclass "basic" / "plus" / "premium"): higher with bigger baskets, more visits, desktop use.
- ``lifetime_value`` (regression, thousands of euros): basket x visits x expected lifetime, plus noise.

About 5% of each target's cells are empty (missing labels) and a few feature cells are empty too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parent / "customers.csv"
REGIONS = ["north", "south", "east", "west"]
DEVICES = ["mobile", "desktop", "tablet"]
PLANS = ["basic", "plus", "premium"]


def make_customers(rows: int = 1000, seed: int = 7) -> pd.DataFrame:
    """The customer table; the same ``rows`` and ``seed`` always give the same table."""
    rng = np.random.default_rng(seed)
    region = rng.choice(REGIONS, size=rows, p=[0.3, 0.25, 0.25, 0.2])
    device = rng.choice(DEVICES, size=rows, p=[0.55, 0.3, 0.15])
    age = rng.integers(18, 80, size=rows)
    tenure = np.minimum(rng.gamma(2.0, 14.0, size=rows), 120).round().astype(int)
    region_visits = pd.Series(region).map({"north": 1.0, "south": 1.2, "east": 0.9, "west": 1.1}).to_numpy()
    visits = rng.poisson(np.clip(3 + 0.04 * (age - 18) + 2.0 * region_visits + 0.05 * tenure, 0.5, None))
    basket = np.exp(rng.normal(3.4 + 0.008 * (age - 40) + 0.3 * (device == "desktop"), 0.45)).round(2)
    tickets = rng.poisson(0.6 + 0.8 * (device == "tablet") + 0.02 * visits)
    discount = rng.uniform(0.0, 0.3, size=rows).round(3)

    z_age = (age - 48) / 18
    z_tenure = (tenure - 28) / 20
    z_visits = (visits - visits.mean()) / visits.std()
    z_basket = (np.log(basket) - 3.4) / 0.45

    # plan: an ordinal score cut at two thresholds
    score = 1.1 * z_basket + 0.7 * z_visits + 0.6 * (device == "desktop") + 0.3 * z_age + rng.normal(0, 0.6, rows)
    plan_idx = np.digitize(score, [-0.3, 0.9])
    plan = np.array(PLANS)[plan_idx]

    # churned: logistic in tenure, tickets, visits, discount and plan
    logit = (
        -0.4
        - 1.3 * z_tenure
        + 0.7 * (tickets - 1)
        - 0.6 * z_visits
        - 4.0 * (discount - 0.15)
        - 0.4 * plan_idx
        + 0.4 * (region == "south")
    )
    churned = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)

    # lifetime value (k€): monthly spend x expected remaining months, lower for churners
    monthly_spend = basket * visits * (1 - discount)
    months = 3 + 0.15 * tenure + 3 * plan_idx - 3 * churned
    ltv = np.clip(monthly_spend * months / 1000 * np.exp(rng.normal(0, 0.15, rows)), 0.0, None).round(3)

    table = pd.DataFrame(
        {
            "id": [f"C{i:05d}" for i in range(1, rows + 1)],
            "age": age.astype(float),
            "tenure_months": tenure.astype(float),
            "monthly_visits": visits.astype(float),
            "avg_basket": basket,
            "support_tickets": tickets.astype(float),
            "discount_rate": discount,
            "region": region.astype(object),
            "device": device.astype(object),
            "churned": churned.astype(float),
            "plan": plan.astype(object),
            "lifetime_value": ltv,
        }
    )
    for column, rate in [("churned", 0.05), ("plan", 0.05), ("lifetime_value", 0.05)]:
        table.loc[rng.random(rows) < rate, column] = np.nan  # missing labels
    for column, rate in [("age", 0.02), ("avg_basket", 0.02), ("device", 0.01)]:
        table.loc[rng.random(rows) < rate, column] = np.nan  # missing features
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    table = make_customers(args.rows, args.seed)
    # Integers stay integers in the file although missing cells made their columns float.
    table.to_csv(args.out, index=False, float_format="%.10g", lineterminator="\n")
    print(f"wrote {len(table)} rows to {args.out}")


if __name__ == "__main__":
    main()
