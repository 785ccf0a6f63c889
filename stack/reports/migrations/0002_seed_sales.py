"""Seed the Sale table that reports aggregate: deterministic rows, so reports are reproducible."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from typing import Any

from django.db import migrations

SEED_ROWS = 20_000
REGIONS = ("north", "south", "east", "west", "central")
PRODUCTS = ("basic", "standard", "premium", "enterprise", "addon", "support")


def seed(apps: Any, schema_editor: Any) -> None:
    sale = apps.get_model("reports", "Sale")
    rng = random.Random(20_240_601)  # noqa: S311 - sample data, not security
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    rows = [
        sale(
            region=rng.choice(REGIONS),
            product=rng.choice(PRODUCTS),
            amount=Decimal(f"{rng.lognormvariate(4.0, 0.8):.2f}"),
            quantity=rng.randint(1, 20),
            sold_at=start + dt.timedelta(minutes=17 * index),
        )
        for index in range(SEED_ROWS)
    ]
    sale.objects.using(schema_editor.connection.alias).bulk_create(rows, batch_size=2000)


def unseed(apps: Any, schema_editor: Any) -> None:
    apps.get_model("reports", "Sale").objects.using(schema_editor.connection.alias).all().delete()


class Migration(migrations.Migration):
    dependencies = [("reports", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
