"""The sample schema and data shared by the demo and the load profiles.

`schema_sql(scale)` is deterministic: scale 1 is 1,000 customers, 200 products and
10,000 orders, and loads in well under a second; `agent_notes` starts empty (where agents
write down what they found).
"""

from __future__ import annotations


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
