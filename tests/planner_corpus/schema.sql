-- The corpus database: TPC-H (public), pgbench (public, as `pgbench -i` creates it), and a
-- small application (public, schema shop, the postgres user's own schema). Loaded into a
-- fresh database by tests/test_planner_analyze.py; the catalog the corpus expects is read from it.

-- TPC-H
CREATE TABLE region (r_regionkey int PRIMARY KEY, r_name char(25) NOT NULL, r_comment varchar(152));
CREATE TABLE nation (n_nationkey int PRIMARY KEY, n_name char(25) NOT NULL, n_regionkey int NOT NULL,
                     n_comment varchar(152));
CREATE TABLE part (p_partkey int PRIMARY KEY, p_name varchar(55), p_mfgr char(25), p_brand char(10),
                   p_type varchar(25), p_size int, p_container char(10), p_retailprice numeric(15,2),
                   p_comment varchar(23));
CREATE TABLE supplier (s_suppkey int PRIMARY KEY, s_name char(25), s_address varchar(40), s_nationkey int,
                       s_phone char(15), s_acctbal numeric(15,2), s_comment varchar(101));
CREATE TABLE partsupp (ps_partkey int, ps_suppkey int, ps_availqty int, ps_supplycost numeric(15,2),
                       ps_comment varchar(199), PRIMARY KEY (ps_partkey, ps_suppkey));
CREATE TABLE customer (c_custkey int PRIMARY KEY, c_name varchar(25), c_address varchar(40), c_nationkey int,
                       c_phone char(15), c_acctbal numeric(15,2), c_mktsegment char(10), c_comment varchar(117));
CREATE TABLE orders (o_orderkey int PRIMARY KEY, o_custkey int, o_orderstatus char(1), o_totalprice numeric(15,2),
                     o_orderdate date, o_orderpriority char(15), o_clerk char(15), o_shippriority int,
                     o_comment varchar(79));
CREATE TABLE lineitem (l_orderkey int, l_partkey int, l_suppkey int, l_linenumber int, l_quantity numeric(15,2),
                       l_extendedprice numeric(15,2), l_discount numeric(15,2), l_tax numeric(15,2),
                       l_returnflag char(1), l_linestatus char(1), l_shipdate date, l_commitdate date,
                       l_receiptdate date, l_shipinstruct char(25), l_shipmode char(10), l_comment varchar(44),
                       PRIMARY KEY (l_orderkey, l_linenumber));
CREATE VIEW revenue0 (supplier_no, total_revenue) AS
    SELECT l_suppkey, sum(l_extendedprice * (1 - l_discount)) FROM lineitem
    WHERE l_shipdate >= date '1996-01-01' AND l_shipdate < date '1996-01-01' + interval '3' month
    GROUP BY l_suppkey;

-- pgbench -i (as pgbench 18 sends it)
create table pgbench_history(tid int,bid int,aid    int,delta int,mtime timestamp,filler char(22));
create table pgbench_tellers(tid int not null,bid int,tbalance int,filler char(84)) with (fillfactor=100);
create table pgbench_accounts(aid    int not null,bid int,abalance int,filler char(84)) with (fillfactor=100);
create table pgbench_branches(bid int not null,bbalance int,filler char(88)) with (fillfactor=100);
alter table pgbench_branches add primary key (bid);
alter table pgbench_tellers add primary key (tid);
alter table pgbench_accounts add primary key (aid);

-- an application
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE users (id bigserial PRIMARY KEY, email text UNIQUE NOT NULL, name text, role text DEFAULT 'member',
                    mood mood, created_at timestamptz NOT NULL DEFAULT now(), profile jsonb DEFAULT '{}');
CREATE TABLE events (id bigserial PRIMARY KEY, user_id bigint REFERENCES users (id) ON DELETE CASCADE,
                     kind text NOT NULL, payload jsonb, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE documents (id serial PRIMARY KEY, title text, body text, tags text[], meta jsonb);
CREATE TABLE jobs (id bigserial PRIMARY KEY, queue text NOT NULL DEFAULT 'default', payload jsonb,
                   status text NOT NULL DEFAULT 'pending', locked_at timestamptz, attempts int DEFAULT 0);
CREATE TABLE settings (key text PRIMARY KEY, value text);
CREATE TABLE audit_log (id bigserial PRIMARY KEY, at timestamptz DEFAULT now(), actor text, action text);
CREATE TABLE categories (id int PRIMARY KEY, parent_id int REFERENCES categories (id), name text);
CREATE TABLE measurements (city_id int NOT NULL, logdate date NOT NULL, peaktemp int) PARTITION BY RANGE (logdate);
CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE UNLOGGED TABLE cache_entries (k text PRIMARY KEY, v bytea);
CREATE SEQUENCE invoice_seq;
CREATE TABLE tenant_notes (tenant_id int NOT NULL, body text);
ALTER TABLE tenant_notes ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_notes USING (tenant_id = current_setting('app.tenant_id')::int);
-- shadows pg_catalog.upper(text) only for a search_path that lists public before pg_catalog
CREATE FUNCTION public.upper(text) RETURNS text LANGUAGE sql VOLATILE AS 'SELECT pg_catalog.upper($1)';
CREATE VIEW user_emails AS SELECT id, email FROM users;
CREATE VIEW recent_users AS SELECT id, email FROM users WHERE created_at > now() - interval '30 days';
CREATE VIEW shuffled_users AS SELECT id FROM users ORDER BY random();
CREATE MATERIALIZED VIEW daily_signups AS
    SELECT date_trunc('day', created_at) AS day, count(*) AS n FROM users GROUP BY 1;
CREATE FUNCTION slugify(t text) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT lower(replace(t, ' ', '-')) $$;
CREATE FUNCTION user_event_count(uid bigint) RETURNS bigint LANGUAGE sql STABLE
    AS $$ SELECT count(*) FROM events WHERE user_id = uid $$;
CREATE FUNCTION touch_job(jid bigint) RETURNS void LANGUAGE sql VOLATILE
    AS $$ UPDATE jobs SET locked_at = now() WHERE id = jid $$;
CREATE FUNCTION add_one(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 + 1';
CREATE FUNCTION add_one(bigint) RETURNS bigint LANGUAGE sql VOLATILE AS 'SELECT $1 + 1';

CREATE SCHEMA shop;
CREATE TABLE shop.customers (id serial PRIMARY KEY, name text NOT NULL, region text, created_at timestamptz DEFAULT now());
CREATE TABLE shop.products (id serial PRIMARY KEY, sku text UNIQUE, name text, price numeric(10,2),
                            attrs jsonb DEFAULT '{}');
CREATE TABLE shop.orders (id bigserial PRIMARY KEY, customer_id int REFERENCES shop.customers (id),
                          total numeric(12,2), status text DEFAULT 'new', created_at timestamptz DEFAULT now());
CREATE TABLE shop.order_items (order_id bigint REFERENCES shop.orders (id) ON DELETE CASCADE,
                               product_id int REFERENCES shop.products (id), qty int, price numeric(10,2),
                               PRIMARY KEY (order_id, product_id));
CREATE FUNCTION shop.price_with_tax(p numeric) RETURNS numeric LANGUAGE sql IMMUTABLE AS $$ SELECT p * 1.2 $$;

-- alice's own schema: for her, "$user" comes first on the default search_path
CREATE SCHEMA alice;
CREATE TABLE alice.notes (id int, body text);
CREATE TABLE public.notes (id int, body text);
