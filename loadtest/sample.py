"""The sample schemas and data shared by the demo, the benchmarks and the load profiles.

`schema_sql(scale)` ("sample") is deterministic: scale 1 is 1,000 customers, 200 products and
10,000 orders, and loads in well under a second; `agent_notes` starts empty (where agents
write down what they found).

`shop_sql(scale)` ("shop", for the write-heavy agent mix of loadtest/writes_bench.py and the
`agent-writes` profile) is customers <- orders <- order_items -> products with plain foreign
keys (no ON DELETE/UPDATE actions) and a `last_seen` stamp on customers; scale 1 is 10,000
customers, 200 products, 50,000 orders and 100,000 order items (two per order; each order's
`total` is the sum of its items). Its table names are the sample's: one database holds one.
"""

from __future__ import annotations

from collections.abc import Callable


def schema_sql(scale: int = 1) -> str:
    customers, products, orders = 1000 * scale, 200 * scale, 10_000 * scale
    return f"""
DROP TABLE IF EXISTS agent_notes, orders, products, customers CASCADE;
CREATE TABLE customers (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    country text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE TABLE products (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    category text NOT NULL,
    price numeric(10, 2) NOT NULL
);
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers,
    product_id bigint NOT NULL REFERENCES products,
    quantity int NOT NULL,
    status text NOT NULL,
    ordered_at timestamptz NOT NULL
);
INSERT INTO customers
SELECT i, 'customer ' || i, 'c' || i || '@example.com',
       (ARRAY['DE','FR','IN','JP','US','BR'])[1 + i % 6],
       timestamptz '2025-01-01' + (i % 365) * interval '1 day'
FROM generate_series(1::bigint, {customers}) AS i;
INSERT INTO products
SELECT i, 'product ' || i, (ARRAY['books','games','tools','food'])[1 + i % 4],
       ((i * 37) % 10000) / 100.0 + 1
FROM generate_series(1::bigint, {products}) AS i;
INSERT INTO orders
SELECT i, 1 + (i * 7919) % {customers}, 1 + (i * 104729) % {products}, 1 + i % 5,
       (ARRAY['new','paid','shipped','returned'])[1 + i % 4],
       timestamptz '2025-01-01' + (i % 500) * interval '17 hours'
FROM generate_series(1::bigint, {orders}) AS i;
CREATE TABLE agent_notes (
    id bigserial PRIMARY KEY,
    agent int NOT NULL,
    subject text NOT NULL,
    note text NOT NULL,
    noted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer_idx ON orders (customer_id);
ANALYZE customers, products, orders;
"""


def shop_sql(scale: int = 1) -> str:
    customers, products, orders = 10_000 * scale, 200 * scale, 50_000 * scale
    # item j (0, 1) of order i: its product and quantity, the same in both INSERTs
    product, qty = f"1 + ((2 * i + j) * 104729) % {products}", "1 + (i + j) % 3"
    return f"""
DROP TABLE IF EXISTS order_items, orders, products, customers CASCADE;
CREATE TABLE customers (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    country text NOT NULL,
    created_at timestamptz NOT NULL,
    last_seen timestamptz
);
CREATE TABLE products (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    category text NOT NULL,
    price numeric(10, 2) NOT NULL
);
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers,
    status text NOT NULL,
    ordered_at timestamptz NOT NULL,
    total numeric(12, 2) NOT NULL
);
CREATE TABLE order_items (
    id bigint PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES orders,
    product_id bigint NOT NULL REFERENCES products,
    qty int NOT NULL,
    price numeric(10, 2) NOT NULL
);
INSERT INTO customers
SELECT i, 'customer ' || i, 'c' || i || '@example.com',
       (ARRAY['DE','FR','IN','JP','US','BR'])[1 + i % 6],
       timestamptz '2024-01-01' + (i % 365) * interval '1 day',
       timestamptz '2025-06-01' + (i % 1000) * interval '1 hour'
FROM generate_series(1::bigint, {customers}) AS i;
INSERT INTO products
SELECT i, 'product ' || i, (ARRAY['books','games','tools','food','garden'])[1 + i % 5],
       ((i * 37) % 10000) / 100.0 + 1
FROM generate_series(1::bigint, {products}) AS i;
INSERT INTO orders
SELECT i, 1 + (i * 7919) % {customers}, (ARRAY['new','paid','shipped','returned'])[1 + i % 4],
       timestamptz '2025-01-01' + i * interval '7 minutes',
       (SELECT sum(({qty}) * p.price) FROM generate_series(0, 1) AS j
        JOIN products p ON p.id = {product})
FROM generate_series(1::bigint, {orders}) AS i;
INSERT INTO order_items
SELECT 2 * i - 1 + j, i, {product}, {qty}, p.price
FROM generate_series(1::bigint, {orders}) AS i CROSS JOIN generate_series(0, 1) AS j
JOIN products p ON p.id = {product};
CREATE INDEX orders_customer_idx ON orders (customer_id, ordered_at);
CREATE INDEX order_items_order_idx ON order_items (order_id);
CREATE INDEX order_items_product_idx ON order_items (product_id);
ANALYZE customers, products, orders, order_items;
"""


# what a profile's `schema` key names: the SQL that (re)creates it at a scale
SCHEMAS: dict[str, Callable[[int], str]] = {"sample": schema_sql, "shop": shop_sql}
