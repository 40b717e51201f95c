//! The broker's tables (its migrations, component `broker`) and every statement it runs.
//!
//! Tables (all in the schema first on the connection's `search_path`):
//! - `celery_rs_tasks`: one row per message waiting, leased or held until its eta. A row is ready
//!   when `leased_until IS NULL AND run_at <= now()`; taking it sets `leased_until` (the
//!   visibility timeout, renewed by its consumer) and bumps `deliveries`, which is also the lease's
//!   fencing token: every settling statement (ack, requeue, defer, dead-letter, renew) names the
//!   token it was handed, so settling a delivery whose lease was lost and taken by another consumer
//!   changes nothing. The count only ever grows, also through a dead-letter, so a token never
//!   comes back. Acked rows are deleted in batches. Dead letters are rows of the queue
//!   `<queue>.dead` with their `reason` (the view `celery_rs_dead_letters` lists them).
//! - `celery_rs_exchanges`, `celery_rs_bindings`: direct, topic and fanout routing.
//! - `celery_rs_broadcasts` (unlogged): every broadcast, with a random nonce, kept a minute (see
//!   [`super::broadcast`]).
//! - `celery_rs_leases` (beat's leader: a row with an expiry), `celery_rs_documents` (beat's state).
//! - `celery_rs_workers`: one row per consuming worker (its name, a nonce per process, and
//!   `alive_until`, renewed every `worker_heartbeat` to now + `worker_grace`); a leased task names
//!   its `holder`. A worker whose row expired is deleted with the return of what it held, in one
//!   statement ([`RESTORE_DEAD`]), so its tasks come back in seconds, not after the visibility
//!   timeout (see [`super::holder`]).
//! - Flow control ([`super::limits`]): `celery_rs_rate_buckets` (a cluster-wide rate limit: the
//!   next free start of each bucket, reserved by `celery_rs_rate_reserve`, which deletes the
//!   buckets idle for a minute when it creates one and keeps at most 100,000),
//!   `celery_rs_key_slots` (per-key concurrency: one row per held slot, its holder and lease
//!   expiry; at most 100,000 keys with slots or parked messages) and `celery_rs_parked`
//!   (messages waiting for a slot of their key, with their queue and priority). The functions
//!   `celery_rs_key_acquire`, `_release` and `_sweep` each run under a transaction-level advisory
//!   lock of the key (schema and key hashed), taken before they read: what they decide ("full,
//!   park it", "freed, move one back") sees every earlier step of the key committed. Moving a
//!   parked message back (`celery_rs_key_unpark`) inserts it into `celery_rs_tasks` and notifies
//!   its queue like a publish. A task without a concurrency key touches none of these.
//! - Fair queues (migrations 7 to 9, `FAIR_PUBLISH`, `FAIR_FETCH`): a keyed task's row has its
//!   `fair_key` and its priority plus 1,000, so keyed rows sort after every unkeyed row of their
//!   queue in the ready index (the unkeyed rows of a fair queue are found without walking past
//!   keyed ones, and a consumer that does not know yet that the queue is fair still takes keyed
//!   rows, after the unkeyed ones); the partial index `celery_rs_tasks_fair` finds a key's ready
//!   rows, `celery_rs_tasks_fair_leased` whether it has leased ones. `celery_rs_fair_queues` has a
//!   row per fair queue (its `front`, `top` and the credit left to the front key, locked `FOR
//!   UPDATE` by each fair fetch: one consumer at a time takes from a fair queue),
//!   `celery_rs_fair_ring` its keys with messages (`""` for its unkeyed rows), each with a `turn`
//!   from the sequence `celery_rs_fair_turn`, set when it joins and never changed. A pass is the
//!   keys whose turn is below `top` (the sequence's value when the pass began); the ring is read
//!   in turn from the first of them at or after `front`, round to those before it (served in this
//!   pass), then the keys that joined during the pass (turn at or after `top`), so a key that
//!   joins waits behind every key already in the ring, never ahead of one (a key that drained and
//!   comes back joins again). A fetch moves `front` past the keys it served; when it went round
//!   (its last key was one before `front` or one that joined), `top` moves to the sequence's
//!   value and the keys that joined are members of the next pass; a fetch that stopped among
//!   the joiners leaves `front` where its reading began, not past the joiner (the next pass would
//!   start again at the lowest turns: a second turn in a row for those keys) (migration 8; migration 7 gave
//!   each key served a new turn, a write per key that a drain piled up as dead rows). The credit
//!   is the rest of the turn of the key at `front` and goes to no other key: a key that left the
//!   ring takes it along. A keyed publish (and the return of a parked
//!   keyed task, and a transactional send until its transaction ends) adds its key under a
//!   shared advisory lock of the key (of its stripe of the queue, 16 a queue, migration 9;
//!   before, of the whole queue, which a transactional send of an earlier version still takes);
//!   a fetch drops a key without rows (ready, waiting for an eta or leased: leased and waiting
//!   rows come back without any event, so their key stays) only under the queue's lock and the
//!   key's taken exclusively, and the rotation once no keyed row is left under all of them
//!   (tried, never waited for), so a key never leaves while a publish of it is uncommitted, and
//!   an open transaction keeps only the keys of its stripes (the locks are keyed by the oid of
//!   `celery_rs_tasks`, the same whatever a caller's first schema). The front passes the keys read without a ready row (only
//!   waiting or leased ones) with those served. The rows are read key by key in one statement,
//!   each key from its last row taken in this fetch on, and locked as read (`FOR UPDATE SKIP
//!   LOCKED`, so a row is taken only while ready in its queue): when one round may fill the
//!   fetch, the keys in turn, each up to its weight (the front key its credit), stopping at the
//!   fetch size (the keys after are not read); otherwise as many whole rounds as fill it if every
//!   key has enough, taken by round then turn (the rows of the last round beyond the fetch size
//!   stay locked, not taken, until the fetch commits), then more rounds from the keys that gave
//!   all they were asked while the fetch is short. Its cost follows the rows taken, not the
//!   ring's length (migration 7 read every key of the ring, ranked the candidates, then locked
//!   the rows taken in a second step). A fair
//!   fetch left short while no key it read may have more reads on from the front it moved, as
//!   the next fetch would, window after window (up to 16 of the keys one fetch reads, migration
//!   9), and only then takes the queue's oldest ready rows beyond the keys read (a ring longer
//!   than that), or whose key is not in the ring (none is expected), and puts their keys back.
//!   The function that picks the rows (`celery_rs_fair_take`, migration 9) also leases them, in
//!   a statement of its own: a row committed while the fetch waited for the queue's row is seen
//!   (the fetch statement's snapshot is older).
//! - The function `celery_rs_task_id(payload)`: the task id in a payload's headers, read by the
//!   server (NULL when it does not parse), so that a message too large for its consumer is
//!   dead-lettered, and its task named, without its payload being sent.
//!
//! Autovacuum: `celery_rs_tasks` is a queue table (every row inserted, updated once or twice,
//! deleted), so it is vacuumed after 2% of its rows (at least 1000) are dead instead of the default
//! 20%, analyzed after 5%, without cost-based sleeping (`autovacuum_vacuum_cost_delay = 0`), and
//! filled to 80% so that lease updates find room on their page. `celery_rs_broadcasts` is vacuumed
//! after 100 dead rows.

use super::migrate::Migration;

/// The broker's component name in `celery_rs_schema_version`.
pub const COMPONENT: &str = "broker";

/// The broker's migrations, in order (public for the tests that upgrade a schema from an earlier
/// version).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "tasks, routing, broadcasts, leases and documents",
        sql: "
CREATE TABLE IF NOT EXISTS celery_rs_tasks (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    priority smallint NOT NULL DEFAULT 0,
    run_at timestamp with time zone NOT NULL DEFAULT now(),
    leased_until timestamp with time zone,
    deliveries integer NOT NULL DEFAULT 0,
    reason text,
    payload bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS celery_rs_tasks_ready ON celery_rs_tasks (queue, priority, run_at, id)
    WHERE leased_until IS NULL;
CREATE INDEX IF NOT EXISTS celery_rs_tasks_leased ON celery_rs_tasks (leased_until)
    WHERE leased_until IS NOT NULL;
ALTER TABLE celery_rs_tasks SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);
CREATE OR REPLACE VIEW celery_rs_dead_letters AS
    SELECT id, queue, reason, run_at AS dead_at, payload FROM celery_rs_tasks WHERE reason IS NOT NULL;
CREATE TABLE IF NOT EXISTS celery_rs_exchanges (
    name text PRIMARY KEY,
    kind text NOT NULL
);
CREATE TABLE IF NOT EXISTS celery_rs_bindings (
    exchange text NOT NULL,
    routing_key text NOT NULL,
    queue text NOT NULL,
    PRIMARY KEY (exchange, routing_key, queue)
);
CREATE TABLE IF NOT EXISTS celery_rs_broadcasts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body bytea NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS celery_rs_broadcasts_created ON celery_rs_broadcasts (created_at);
ALTER TABLE celery_rs_broadcasts SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 100
);
CREATE TABLE IF NOT EXISTS celery_rs_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires_at timestamp with time zone NOT NULL
);
CREATE TABLE IF NOT EXISTS celery_rs_documents (
    key text PRIMARY KEY,
    doc bytea NOT NULL,
    updated_at timestamp with time zone NOT NULL DEFAULT now()
);
",
    },
    Migration {
        version: 2,
        name: "broadcasts as rows announced by id and nonce; the task id of an unread payload",
        sql: "
DROP TABLE IF EXISTS celery_rs_broadcasts;
CREATE UNLOGGED TABLE celery_rs_broadcasts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    nonce bigint NOT NULL,
    exchange text NOT NULL,
    routing_key text NOT NULL,
    body bytea NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now()
);
CREATE INDEX celery_rs_broadcasts_created ON celery_rs_broadcasts (created_at);
ALTER TABLE celery_rs_broadcasts SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000
);
CREATE OR REPLACE FUNCTION celery_rs_task_id(payload bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN left(convert_from(payload, 'UTF8')::jsonb -> 'headers' ->> 'id', 255);
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;
",
    },
    Migration {
        version: 3,
        name: "workers with heartbeats; the holder of a leased task",
        sql: "
CREATE TABLE IF NOT EXISTS celery_rs_workers (
    name text PRIMARY KEY,
    nonce text NOT NULL,
    alive_until timestamp with time zone NOT NULL
);
ALTER TABLE celery_rs_tasks ADD COLUMN IF NOT EXISTS holder text;
CREATE INDEX IF NOT EXISTS celery_rs_tasks_holder ON celery_rs_tasks (holder)
    WHERE leased_until IS NOT NULL;
",
    },
    Migration {
        version: 4,
        name: "flow control: rate buckets, key slots, parked messages",
        sql: "
CREATE TABLE IF NOT EXISTS celery_rs_rate_buckets (
    name text PRIMARY KEY,
    next_at timestamp with time zone NOT NULL
);
CREATE TABLE IF NOT EXISTS celery_rs_key_slots (
    key text NOT NULL,
    holder text NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    PRIMARY KEY (key, holder)
);
CREATE INDEX IF NOT EXISTS celery_rs_key_slots_expires ON celery_rs_key_slots (expires_at);
CREATE TABLE IF NOT EXISTS celery_rs_parked (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key text NOT NULL,
    queue text NOT NULL,
    priority smallint NOT NULL,
    payload bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS celery_rs_parked_key ON celery_rs_parked (key, id);
CREATE OR REPLACE FUNCTION celery_rs_key_lock(p_key text) RETURNS void
LANGUAGE sql VOLATILE AS $$
    SELECT pg_advisory_xact_lock(hashtext('celery_rs_key:' || coalesce(current_schema(), '')), hashtext(p_key))
$$;
CREATE OR REPLACE FUNCTION celery_rs_key_unpark(p_key text, p_n integer, p_channel text) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE moved integer;
BEGIN
    WITH m AS (
        DELETE FROM celery_rs_parked WHERE id IN (
            SELECT id FROM celery_rs_parked WHERE key = p_key ORDER BY id LIMIT p_n)
        RETURNING queue, priority, payload, id),
    ins AS (
        INSERT INTO celery_rs_tasks (queue, priority, payload)
        SELECT queue, priority, payload FROM m ORDER BY id
        RETURNING queue),
    notes AS (SELECT pg_notify(p_channel, q) FROM (SELECT DISTINCT queue AS q FROM ins) d)
    SELECT (SELECT count(*) FROM ins) + 0 * (SELECT count(*) FROM notes) INTO moved;
    RETURN moved;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_key_acquire(p_key text, p_limit integer, p_holder text, p_ttl float8,
    p_queue text, p_priority smallint, p_payload bytea) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM celery_rs_key_lock(p_key);
    IF EXISTS (SELECT 1 FROM celery_rs_key_slots WHERE key = p_key AND holder = p_holder)
        OR (SELECT count(*) FROM celery_rs_key_slots WHERE key = p_key AND expires_at > clock_timestamp()) < p_limit
    THEN
        INSERT INTO celery_rs_key_slots (key, holder, expires_at)
        VALUES (p_key, p_holder, clock_timestamp() + make_interval(secs => p_ttl))
        ON CONFLICT (key, holder) DO UPDATE SET expires_at = EXCLUDED.expires_at;
        RETURN true;
    END IF;
    INSERT INTO celery_rs_parked (key, queue, priority, payload) VALUES (p_key, p_queue, p_priority, p_payload);
    RETURN false;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_key_release(p_key text, p_holder text, p_channel text) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM celery_rs_key_lock(p_key);
    DELETE FROM celery_rs_key_slots WHERE key = p_key AND holder = p_holder;
    IF FOUND OR NOT EXISTS (SELECT 1 FROM celery_rs_key_slots WHERE key = p_key) THEN
        RETURN celery_rs_key_unpark(p_key, 1, p_channel);
    END IF;
    RETURN 0;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_key_sweep(p_channel text, p_keys integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    k text;
    n integer;
    moved bigint := 0;
BEGIN
    FOR k IN
        (SELECT key FROM celery_rs_key_slots WHERE expires_at < clock_timestamp() GROUP BY key LIMIT p_keys)
        UNION
        (WITH RECURSIVE ks AS (
            (SELECT key FROM celery_rs_parked ORDER BY key LIMIT 1)
            UNION ALL
            SELECT (SELECT p.key FROM celery_rs_parked p WHERE p.key > ks.key ORDER BY p.key LIMIT 1)
            FROM ks WHERE ks.key IS NOT NULL)
        SELECT ks.key FROM ks WHERE ks.key IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM celery_rs_key_slots s WHERE s.key = ks.key)
        LIMIT p_keys)
    LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock(
            hashtext('celery_rs_key:' || coalesce(current_schema(), '')), hashtext(k));
        DELETE FROM celery_rs_key_slots WHERE key = k AND expires_at < clock_timestamp();
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 0 AND NOT EXISTS (SELECT 1 FROM celery_rs_key_slots WHERE key = k) THEN
            n := 1;
        END IF;
        IF n > 0 THEN
            moved := moved + celery_rs_key_unpark(k, n, p_channel);
        END IF;
    END LOOP;
    RETURN moved;
END $$;
",
    },
    Migration {
        version: 5,
        name: "flow control bounds: keys tracked and rate buckets capped, idle buckets deleted",
        sql: "
CREATE OR REPLACE FUNCTION celery_rs_key_tracked_at_least(p_max integer) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE parked_keys bigint;
BEGIN
    SELECT count(*) INTO parked_keys FROM (
        WITH RECURSIVE pk AS (
            (SELECT key FROM celery_rs_parked ORDER BY key LIMIT 1)
            UNION ALL
            SELECT (SELECT p.key FROM celery_rs_parked p WHERE p.key > pk.key ORDER BY p.key LIMIT 1)
            FROM pk WHERE pk.key IS NOT NULL)
        SELECT key FROM pk WHERE key IS NOT NULL LIMIT p_max) r;
    IF (SELECT count(*) FROM (SELECT 1 FROM celery_rs_key_slots LIMIT p_max) r) + parked_keys < p_max THEN
        RETURN false;
    END IF;
    RETURN (SELECT count(*) FROM (
        WITH RECURSIVE sk AS (
            (SELECT key FROM celery_rs_key_slots ORDER BY key LIMIT 1)
            UNION ALL
            SELECT (SELECT s.key FROM celery_rs_key_slots s WHERE s.key > sk.key ORDER BY s.key LIMIT 1)
            FROM sk WHERE sk.key IS NOT NULL),
        pk AS (
            (SELECT key FROM celery_rs_parked ORDER BY key LIMIT 1)
            UNION ALL
            SELECT (SELECT p.key FROM celery_rs_parked p WHERE p.key > pk.key ORDER BY p.key LIMIT 1)
            FROM pk WHERE pk.key IS NOT NULL)
        SELECT key FROM sk WHERE key IS NOT NULL UNION SELECT key FROM pk WHERE key IS NOT NULL LIMIT p_max) r) >= p_max;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_key_acquire(p_key text, p_limit integer, p_holder text, p_ttl float8,
    p_queue text, p_priority smallint, p_payload bytea, p_max_keys integer) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM celery_rs_key_lock(p_key);
    IF NOT EXISTS (SELECT 1 FROM celery_rs_key_slots WHERE key = p_key)
        AND NOT EXISTS (SELECT 1 FROM celery_rs_parked WHERE key = p_key)
        AND celery_rs_key_tracked_at_least(p_max_keys)
    THEN
        RAISE EXCEPTION 'too many concurrency keys tracked at once (the limit is %)', p_max_keys;
    END IF;
    IF EXISTS (SELECT 1 FROM celery_rs_key_slots WHERE key = p_key AND holder = p_holder)
        OR (SELECT count(*) FROM celery_rs_key_slots WHERE key = p_key AND expires_at > clock_timestamp()) < p_limit
    THEN
        INSERT INTO celery_rs_key_slots (key, holder, expires_at)
        VALUES (p_key, p_holder, clock_timestamp() + make_interval(secs => p_ttl))
        ON CONFLICT (key, holder) DO UPDATE SET expires_at = EXCLUDED.expires_at;
        RETURN true;
    END IF;
    IF p_payload IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO celery_rs_parked (key, queue, priority, payload) VALUES (p_key, p_queue, p_priority, p_payload);
    RETURN false;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_key_acquire(p_key text, p_limit integer, p_holder text, p_ttl float8,
    p_queue text, p_priority smallint, p_payload bytea) RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT celery_rs_key_acquire(p_key, p_limit, p_holder, p_ttl, p_queue, p_priority, p_payload, 100000)
$$;
CREATE OR REPLACE FUNCTION celery_rs_rate_reserve(p_name text, p_secs float8, p_max integer) RETURNS float8
LANGUAGE plpgsql VOLATILE AS $$
DECLARE wait float8;
BEGIN
    UPDATE celery_rs_rate_buckets SET next_at = greatest(next_at, clock_timestamp()) + make_interval(secs => p_secs)
    WHERE name = p_name
    RETURNING extract(epoch FROM next_at - clock_timestamp())::float8 - p_secs INTO wait;
    IF FOUND THEN
        RETURN wait;
    END IF;
    DELETE FROM celery_rs_rate_buckets WHERE next_at < clock_timestamp() - interval '1 minute';
    IF (SELECT count(*) FROM (SELECT 1 FROM celery_rs_rate_buckets LIMIT p_max) b) >= p_max THEN
        RAISE EXCEPTION 'too many rate buckets (the limit is %)', p_max;
    END IF;
    INSERT INTO celery_rs_rate_buckets AS b (name, next_at) VALUES (p_name, clock_timestamp() + make_interval(secs => p_secs))
    ON CONFLICT (name) DO UPDATE SET next_at = greatest(b.next_at, clock_timestamp()) + make_interval(secs => p_secs)
    RETURNING extract(epoch FROM b.next_at - clock_timestamp())::float8 - p_secs INTO wait;
    RETURN wait;
END $$;
",
    },
    Migration {
        version: 6,
        name: "key slots taken and released in batches, committed without waiting for the WAL flush",
        sql: "
CREATE OR REPLACE FUNCTION celery_rs_key_release_lock(p_key text, p_shared boolean) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_shared THEN
        PERFORM pg_advisory_xact_lock_shared(hashtext('celery_rs_key_r:' || coalesce(current_schema(), '')), hashtext(p_key));
    ELSE
        PERFORM pg_advisory_xact_lock(hashtext('celery_rs_key_r:' || coalesce(current_schema(), '')), hashtext(p_key));
    END IF;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_key_unpark(p_key text, p_n integer, p_channel text) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE moved integer;
BEGIN
    WITH m AS (
        DELETE FROM celery_rs_parked WHERE id IN (
            SELECT id FROM celery_rs_parked WHERE key = p_key ORDER BY id LIMIT p_n FOR UPDATE SKIP LOCKED)
        RETURNING queue, priority, payload, id),
    ins AS (
        INSERT INTO celery_rs_tasks (queue, priority, payload)
        SELECT queue, priority, payload FROM m ORDER BY id
        RETURNING queue),
    notes AS (SELECT pg_notify(p_channel, q) FROM (SELECT DISTINCT queue AS q FROM ins) d)
    SELECT (SELECT count(*) FROM ins) + 0 * (SELECT count(*) FROM notes) INTO moved;
    RETURN moved;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_key_acquire(p_key text, p_limit integer, p_holder text, p_ttl float8,
    p_queue text, p_priority smallint, p_payload bytea, p_max_keys integer) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM celery_rs_key_lock(p_key);
    IF p_payload IS NOT NULL THEN
        PERFORM celery_rs_key_release_lock(p_key, false);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM celery_rs_key_slots WHERE key = p_key)
        AND NOT EXISTS (SELECT 1 FROM celery_rs_parked WHERE key = p_key)
        AND celery_rs_key_tracked_at_least(p_max_keys)
    THEN
        RAISE EXCEPTION 'too many concurrency keys tracked at once (the limit is %)', p_max_keys;
    END IF;
    IF EXISTS (SELECT 1 FROM celery_rs_key_slots WHERE key = p_key AND holder = p_holder)
        OR (SELECT count(*) FROM celery_rs_key_slots WHERE key = p_key AND expires_at > clock_timestamp()) < p_limit
    THEN
        INSERT INTO celery_rs_key_slots (key, holder, expires_at)
        VALUES (p_key, p_holder, clock_timestamp() + make_interval(secs => p_ttl))
        ON CONFLICT (key, holder) DO UPDATE SET expires_at = EXCLUDED.expires_at;
        RETURN true;
    END IF;
    IF p_payload IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO celery_rs_parked (key, queue, priority, payload) VALUES (p_key, p_queue, p_priority, p_payload);
    RETURN false;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_key_acquire_many(p_keys text[], p_limits integer[], p_holders text[],
    p_ttls float8[], p_max_keys integer) RETURNS smallint[]
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r record;
    res smallint[] := array_fill(0::smallint, ARRAY[coalesce(cardinality(p_keys), 0)]);
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR r IN SELECT u.k, u.l, u.h, u.t, u.i
        FROM unnest(p_keys, p_limits, p_holders, p_ttls) WITH ORDINALITY AS u(k, l, h, t, i)
        ORDER BY hashtext(u.k), u.k, u.i
    LOOP
        PERFORM celery_rs_key_lock(r.k);
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM celery_rs_key_slots WHERE key = r.k)
            AND NOT EXISTS (SELECT 1 FROM celery_rs_parked WHERE key = r.k)
            AND celery_rs_key_tracked_at_least(p_max_keys);
        IF EXISTS (SELECT 1 FROM celery_rs_key_slots WHERE key = r.k AND holder = r.h)
            OR (SELECT count(*) FROM celery_rs_key_slots WHERE key = r.k AND expires_at > clock_timestamp()) < r.l
        THEN
            INSERT INTO celery_rs_key_slots (key, holder, expires_at)
            VALUES (r.k, r.h, clock_timestamp() + make_interval(secs => r.t))
            ON CONFLICT (key, holder) DO UPDATE SET expires_at = EXCLUDED.expires_at;
            res[r.i] := 1;
        END IF;
    END LOOP;
    RETURN res;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_key_release_many(p_keys text[], p_holders text[], p_channel text)
RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r record;
    moved integer := 0;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR r IN SELECT u.k, u.h FROM unnest(p_keys, p_holders) AS u(k, h) ORDER BY hashtext(u.k), u.k LOOP
        PERFORM celery_rs_key_release_lock(r.k, true);
        DELETE FROM celery_rs_key_slots WHERE key = r.k AND holder = r.h;
        IF FOUND OR NOT EXISTS (SELECT 1 FROM celery_rs_key_slots WHERE key = r.k) THEN
            moved := moved + celery_rs_key_unpark(r.k, 1, p_channel);
        END IF;
    END LOOP;
    RETURN moved;
END $$;
",
    },
    Migration {
        version: 7,
        name: "fair queues: the fairness key of a task, each fair queue's ring of keys and its front key's credit",
        sql: "
ALTER TABLE celery_rs_tasks ADD COLUMN IF NOT EXISTS fair_key text;
CREATE INDEX IF NOT EXISTS celery_rs_tasks_fair ON celery_rs_tasks (queue, fair_key, priority, run_at, id)
    WHERE leased_until IS NULL AND fair_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS celery_rs_tasks_fair_leased ON celery_rs_tasks (queue, fair_key)
    WHERE leased_until IS NOT NULL AND fair_key IS NOT NULL;
CREATE SEQUENCE IF NOT EXISTS celery_rs_fair_turn;
CREATE TABLE IF NOT EXISTS celery_rs_fair_queues (
    queue text PRIMARY KEY,
    credit integer NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS celery_rs_fair_ring (
    queue text NOT NULL,
    key text NOT NULL,
    turn bigint NOT NULL,
    PRIMARY KEY (queue, key)
);
CREATE INDEX IF NOT EXISTS celery_rs_fair_ring_turn ON celery_rs_fair_ring (queue, turn);
ALTER TABLE celery_rs_fair_queues SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE celery_rs_fair_ring SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0);
CREATE OR REPLACE FUNCTION celery_rs_fair_lock(p_queue text, p_shared boolean) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_shared THEN
        PERFORM pg_advisory_xact_lock_shared(hashtext('celery_rs_fair:' || 'celery_rs_tasks'::regclass::oid::text),
            hashtext(p_queue));
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(hashtext('celery_rs_fair:' || 'celery_rs_tasks'::regclass::oid::text),
        hashtext(p_queue));
END $$;
CREATE OR REPLACE FUNCTION celery_rs_fair_of(payload bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE k jsonb;
BEGIN
    IF position(convert_to('x-fairness-key', 'UTF8') IN payload) = 0 THEN
        RETURN NULL;
    END IF;
    k := convert_from(payload, 'UTF8')::jsonb -> 'headers' -> 'x-fairness-key';
    IF jsonb_typeof(k) = 'string' AND octet_length(k #>> '{}') BETWEEN 1 AND 128 THEN
        RETURN k #>> '{}';
    END IF;
    RETURN NULL;
EXCEPTION WHEN others THEN
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_fair_join(p_queue text, p_key text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM celery_rs_fair_lock(p_queue, true);
    -- No pre-check (a caller's REPEATABLE READ snapshot may still see a row a fetch deleted):
    -- ON CONFLICT looks at the committed rows.
    INSERT INTO celery_rs_fair_queues (queue) VALUES (p_queue) ON CONFLICT DO NOTHING;
    INSERT INTO celery_rs_fair_ring (queue, key, turn) VALUES (p_queue, p_key, nextval('celery_rs_fair_turn'))
    ON CONFLICT DO NOTHING;
    INSERT INTO celery_rs_fair_ring (queue, key, turn) VALUES (p_queue, '', nextval('celery_rs_fair_turn'))
    ON CONFLICT DO NOTHING;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_fair_publish(p_queues text[], p_priorities smallint[], p_etas timestamptz[],
    p_payloads bytea[], p_keys text[], p_channel text, p_join boolean DEFAULT true) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- Not p_join: the caller holds the queues' shared fair locks and its keys joined already.
    IF p_join THEN
        PERFORM celery_rs_fair_join(d.q, d.k)
        FROM (SELECT DISTINCT q, k FROM unnest(p_queues, p_keys) AS u(q, k) WHERE k IS NOT NULL ORDER BY q, k) d;
    END IF;
    INSERT INTO celery_rs_tasks (queue, priority, run_at, payload, fair_key)
    SELECT q, CASE WHEN k IS NULL THEN p ELSE p + 1000 END, greatest(now(), coalesce(r, now())), b, k
    FROM unnest(p_queues, p_priorities, p_etas, p_payloads, p_keys) AS u(q, p, r, b, k);
    PERFORM pg_notify(p_channel, CASE WHEN d.fair THEN chr(6) || d.q ELSE d.q END)
    FROM (SELECT q, bool_or(k IS NOT NULL) AS fair FROM unnest(p_queues, p_keys) AS u(q, k) GROUP BY q) d;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_key_unpark(p_key text, p_n integer, p_channel text) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE moved integer;
BEGIN
    WITH m AS (
        DELETE FROM celery_rs_parked WHERE id IN (
            SELECT id FROM celery_rs_parked WHERE key = p_key ORDER BY id LIMIT p_n FOR UPDATE SKIP LOCKED)
        RETURNING queue, priority, payload, id),
    k AS (SELECT queue, priority, payload, id, celery_rs_fair_of(payload) AS fk FROM m),
    j AS (SELECT celery_rs_fair_join(d.queue, d.fk) FROM (SELECT DISTINCT queue, fk FROM k WHERE fk IS NOT NULL) d),
    ins AS (
        INSERT INTO celery_rs_tasks (queue, priority, payload, fair_key)
        SELECT queue, CASE WHEN fk IS NULL THEN priority ELSE priority + 1000 END, payload, fk FROM k ORDER BY id
        RETURNING queue, fair_key),
    notes AS (
        SELECT pg_notify(p_channel, CASE WHEN d.fair THEN chr(6) || d.queue ELSE d.queue END)
        FROM (SELECT queue, bool_or(fair_key IS NOT NULL) AS fair FROM ins GROUP BY queue) d)
    SELECT (SELECT count(*) FROM ins) + 0 * (SELECT count(*) FROM notes) + 0 * (SELECT count(*) FROM j) INTO moved;
    RETURN moved;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_fair_lock_rows(p_queue text, p_ids bigint[]) RETURNS bigint[]
LANGUAGE sql VOLATILE AS $$
    -- The rows picked (read unlocked), locked now if still ready in that queue: one leased, moved
    -- (dead-lettered) or deferred meanwhile by a fetch or settle that does not know the queue is
    -- fair is left out. In the order of p_ids.
    SELECT coalesce(array_agg(l.id ORDER BY u.n), '{}') FROM unnest(p_ids) WITH ORDINALITY AS u(id, n)
    JOIN (SELECT id FROM celery_rs_tasks WHERE id = ANY(p_ids) AND queue = p_queue AND leased_until IS NULL
        AND run_at <= now() FOR UPDATE SKIP LOCKED) l ON l.id = u.id
$$;
CREATE OR REPLACE FUNCTION celery_rs_fair_pick(p_queue text, p_n integer, p_keys text[], p_weights integer[],
    p_visits integer) RETURNS bigint[]
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stored integer;
    ring_keys text[];
    ring_w integer[];
    m integer;
    whole boolean;
    first_credit integer;
    rounds integer;
    c_ids bigint[];
    c_i integer[];
    c_rnd integer[];
    saturated bigint;
    empties text[];
    idle integer[];
    moved text[];
    ids bigint[] := '{}';
    taken integer;
    last_i integer;
    last_rnd integer;
    allot integer;
    served integer := 0;
    more boolean := false;
    next_front integer := 1;
    left_credit integer := 0;
    locked boolean;
BEGIN
    SELECT s.credit INTO stored FROM celery_rs_fair_queues s WHERE s.queue = p_queue FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(k.key ORDER BY k.turn), array_agg(coalesce(p_weights[array_position(p_keys, k.key)], 1) ORDER BY k.turn)
    INTO ring_keys, ring_w
    FROM (SELECT key, turn FROM celery_rs_fair_ring WHERE queue = p_queue ORDER BY turn LIMIT p_visits) k;
    m := coalesce(cardinality(ring_keys), 0);
    whole := m < p_visits;
    saturated := 0;
    IF m > 0 THEN
        first_credit := CASE WHEN stored > 0 THEN stored ELSE ring_w[1] END;
        rounds := CASE WHEN whole THEN (p_n + (SELECT sum(w) FROM unnest(ring_w) w)::integer - 1)
            / (SELECT sum(w) FROM unnest(ring_w) w)::integer ELSE 1 END;
        LOOP
            WITH ring AS (
                SELECT u.k, u.w, u.i::integer AS i, least(p_n, CASE WHEN u.i = 1 THEN first_credit + (rounds - 1) * u.w
                    ELSE rounds * u.w END) AS lim
                FROM unnest(ring_keys, ring_w) WITH ORDINALITY AS u(k, w, i)),
            cand AS (
                SELECT ring.i, ring.w, ring.lim, c.id, c.priority, c.run_at FROM ring CROSS JOIN LATERAL (
                    SELECT t.id, t.priority, t.run_at FROM celery_rs_tasks t
                    WHERE t.queue = p_queue AND t.fair_key = ring.k AND t.leased_until IS NULL AND t.run_at <= now()
                    ORDER BY t.priority, t.run_at, t.id LIMIT ring.lim) c
                WHERE ring.k <> ''
                UNION ALL
                SELECT ring.i, ring.w, ring.lim, c.id, c.priority, c.run_at FROM ring CROSS JOIN LATERAL (
                    SELECT t.id, t.priority, t.run_at FROM celery_rs_tasks t
                    WHERE t.queue = p_queue AND t.leased_until IS NULL AND t.run_at <= now() AND t.priority < 1000
                    ORDER BY t.priority, t.run_at, t.id LIMIT ring.lim) c
                WHERE ring.k = ''),
            ranked AS (
                SELECT r.id, r.i, r.w, r.lim, r.rn,
                    CASE WHEN r.i = 1 THEN CASE WHEN r.rn < first_credit THEN 0 ELSE 1 + (r.rn - first_credit) / r.w END
                        ELSE r.rn / r.w END AS rnd
                FROM (SELECT cand.*, (row_number() OVER (PARTITION BY cand.i ORDER BY cand.priority, cand.run_at, cand.id)
                    - 1)::integer AS rn FROM cand) r)
            SELECT (SELECT array_agg(id ORDER BY rnd, i, rn) FROM ranked),
                (SELECT array_agg(i ORDER BY rnd, i, rn) FROM ranked),
                (SELECT array_agg(rnd ORDER BY rnd, i, rn) FROM ranked),
                (SELECT sum(f.w) FROM (SELECT max(w) AS w FROM ranked GROUP BY i, lim HAVING count(*) >= lim) f),
                (SELECT array_agg(ring.k) FROM ring WHERE ring.k <> '' AND NOT EXISTS (SELECT 1 FROM ranked WHERE ranked.i = ring.i)),
                (SELECT array_agg(ring.i ORDER BY ring.i) FROM ring WHERE NOT EXISTS (SELECT 1 FROM ranked WHERE ranked.i = ring.i))
            INTO c_ids, c_i, c_rnd, saturated, empties, idle;
            saturated := coalesce(saturated, 0);
            -- Beyond a partial ring (not whole) the keys not read wait for the next fetch; the
            -- keys read give more rounds rather than leave the consumer short.
            EXIT WHEN saturated = 0 OR coalesce(cardinality(c_ids), 0) >= p_n OR rounds >= p_n;
            -- Only the keys that gave all that was asked may have more: enough rounds more for them.
            rounds := least(p_n, rounds + greatest(1, (p_n - coalesce(cardinality(c_ids), 0) + saturated::integer - 1)
                / saturated::integer));
        END LOOP;
        taken := least(p_n, coalesce(cardinality(c_ids), 0));
        IF taken > 0 THEN
            ids := celery_rs_fair_lock_rows(p_queue, c_ids[1:taken]);
            last_i := c_i[taken];
            last_rnd := c_rnd[taken];
            allot := CASE WHEN last_i = 1 AND last_rnd = 0 THEN first_credit ELSE ring_w[last_i] END;
            FOR j IN 1 .. taken LOOP
                IF c_i[j] = last_i AND c_rnd[j] = last_rnd THEN
                    served := served + 1;
                END IF;
            END LOOP;
            IF served < allot THEN
                -- Its turn goes on into the next fetch if it has more.
                IF ring_keys[last_i] = '' THEN
                    more := EXISTS (SELECT 1 FROM celery_rs_tasks WHERE queue = p_queue AND leased_until IS NULL
                        AND run_at <= now() AND priority < 1000 AND id <> ALL(ids));
                ELSE
                    more := EXISTS (SELECT 1 FROM celery_rs_tasks WHERE queue = p_queue AND fair_key = ring_keys[last_i]
                        AND leased_until IS NULL AND run_at <= now() AND id <> ALL(ids));
                END IF;
            END IF;
            IF served < allot AND more THEN
                next_front := last_i;
                left_credit := allot - served;
            ELSE
                next_front := last_i % m + 1;
            END IF;
        END IF;
        -- To the back: the keys served before the next front, then the keys read without a ready
        -- row (only waiting or leased ones: they must not hold the front, and the keys behind them).
        moved := ring_keys[1:next_front - 1]
            || ARRAY(SELECT ring_keys[u.i] FROM unnest(idle) AS u(i) WHERE u.i >= next_front ORDER BY u.i);
        IF cardinality(moved) > 0 THEN
            UPDATE celery_rs_fair_ring r SET turn = u.turn
            FROM unnest(moved, ARRAY(SELECT nextval('celery_rs_fair_turn')
                FROM generate_series(1, cardinality(moved)) g ORDER BY g)) AS u(k, turn)
            WHERE r.queue = p_queue AND r.key = u.k;
        END IF;
        IF cardinality(empties) > 0 THEN
            locked := celery_rs_fair_lock(p_queue, false);
            IF locked THEN
                DELETE FROM celery_rs_fair_ring r WHERE r.queue = p_queue AND r.key = ANY(empties)
                    AND NOT EXISTS (SELECT 1 FROM celery_rs_tasks t
                        WHERE t.queue = p_queue AND t.fair_key = r.key AND t.leased_until IS NULL)
                    AND NOT EXISTS (SELECT 1 FROM celery_rs_tasks t
                        WHERE t.queue = p_queue AND t.fair_key = r.key AND t.leased_until IS NOT NULL);
            END IF;
        END IF;
    END IF;
    -- Short, and no key read may have more: the ready rows of keys not in the ring (none is
    -- expected) or beyond the keys read (a ring longer than p_visits), oldest first.
    IF cardinality(ids) < p_n AND saturated = 0 THEN
        c_ids := ARRAY(SELECT id FROM celery_rs_tasks
            WHERE queue = p_queue AND leased_until IS NULL AND run_at <= now() AND id <> ALL(ids)
            ORDER BY priority, run_at, id LIMIT p_n - cardinality(ids) FOR UPDATE SKIP LOCKED);
        IF cardinality(c_ids) > 0 THEN
            ids := ids || c_ids;
            PERFORM celery_rs_fair_join(p_queue, d.fair_key)
            FROM (SELECT DISTINCT fair_key FROM celery_rs_tasks WHERE id = ANY(c_ids) AND fair_key IS NOT NULL) d;
        ELSIF coalesce(locked, celery_rs_fair_lock(p_queue, false))
            AND NOT EXISTS (SELECT 1 FROM celery_rs_fair_ring WHERE queue = p_queue AND key <> '')
        THEN
            DELETE FROM celery_rs_fair_ring WHERE queue = p_queue;
            DELETE FROM celery_rs_fair_queues WHERE queue = p_queue;
            RETURN ids;
        END IF;
    END IF;
    IF left_credit IS DISTINCT FROM stored THEN
        UPDATE celery_rs_fair_queues SET credit = left_credit WHERE queue = p_queue;
    END IF;
    RETURN ids;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_fair_forget(p_queue text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- The queue's row first, then its fair lock: the order a fair fetch takes them in.
    PERFORM 1 FROM celery_rs_fair_queues WHERE queue = p_queue FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Tried, never waited for: an open transaction's keyed send_in holds it shared (a later
    -- fetch drops the empty keys).
    IF NOT celery_rs_fair_lock(p_queue, false) THEN
        RETURN;
    END IF;
    DELETE FROM celery_rs_fair_ring r WHERE r.queue = p_queue AND r.key <> ''
        AND NOT EXISTS (SELECT 1 FROM celery_rs_tasks t
            WHERE t.queue = p_queue AND t.fair_key = r.key AND t.leased_until IS NULL)
        AND NOT EXISTS (SELECT 1 FROM celery_rs_tasks t
            WHERE t.queue = p_queue AND t.fair_key = r.key AND t.leased_until IS NOT NULL);
    IF NOT EXISTS (SELECT 1 FROM celery_rs_fair_ring WHERE queue = p_queue AND key <> '') THEN
        DELETE FROM celery_rs_fair_ring WHERE queue = p_queue;
        DELETE FROM celery_rs_fair_queues WHERE queue = p_queue;
    END IF;
END $$;
",
    },
    Migration {
        version: 8,
        name: "fair queues: the ring read from a front turn (no ring row rewritten per fetch), rows locked as read",
        sql: "
ALTER TABLE celery_rs_fair_queues ADD COLUMN IF NOT EXISTS front bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS top bigint NOT NULL DEFAULT 0;
-- A rotation of migration 7 is in turn order from its first key (which any credit belongs to),
-- and every key in it is a member of the pass.
UPDATE celery_rs_fair_queues f SET front = coalesce((SELECT min(r.turn) FROM celery_rs_fair_ring r
    WHERE r.queue = f.queue), 0), top = (SELECT s.last_value + 1 FROM celery_rs_fair_turn s);
CREATE OR REPLACE FUNCTION celery_rs_fair_pick(p_queue text, p_n integer, p_keys text[], p_weights integer[],
    p_visits integer) RETURNS bigint[]
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stored integer;
    stored_front bigint;
    stored_top bigint;
    ring_keys text[];
    ring_turns bigint[];
    -- 0: in this pass, at or after the front; 1: in this pass, before the front (served in it);
    -- 2: joined during this pass (at or after top).
    ring_laps integer[];
    ring_w integer[];
    m integer;
    first_credit integer;
    -- Per key read: rows asked by this read, rows taken so far, its last row taken (where the
    -- next read of it starts), and whether it gave all it was asked so far (it may have more);
    -- brought up to date only while the fetch is still short.
    lim integer[];
    cnt integer[];
    lp smallint[];
    lr timestamptz[];
    lid bigint[];
    live boolean[];
    r0 integer := 0;
    rounds integer;
    one_round integer;
    next_rounds integer;
    reads integer := 0;
    c_ids bigint[] := '{}';
    c_i integer[] := '{}';
    c_rnd integer[] := '{}';
    saturated boolean := false;
    read_end integer;
    empties text[];
    ids bigint[] := '{}';
    taken integer := 0;
    last_i integer;
    last_rnd integer;
    allot integer;
    served integer := 0;
    more boolean := false;
    next_front bigint;
    next_top bigint;
    left_credit integer := 0;
    locked boolean;
BEGIN
    SELECT s.credit, s.front, s.top INTO stored, stored_front, stored_top
    FROM celery_rs_fair_queues s WHERE s.queue = p_queue FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    next_front := stored_front;
    next_top := stored_top;
    -- The ring in turn from its front. A pass is the keys whose turn is below top (the sequence's
    -- value when the pass began): those at or after the front, then (round the ring) those before
    -- it, served in this pass already; the keys that joined during the pass (their turn at or
    -- after top, from the sequence) come last, behind every key already waiting, and become
    -- members when the front wraps round. Serving a key moves the front past it: no ring row is
    -- rewritten.
    SELECT array_agg(k.key ORDER BY k.lap, k.turn), array_agg(k.turn ORDER BY k.lap, k.turn),
        array_agg(k.lap ORDER BY k.lap, k.turn),
        array_agg(coalesce(p_weights[array_position(p_keys, k.key)], 1) ORDER BY k.lap, k.turn)
    INTO ring_keys, ring_turns, ring_laps, ring_w
    FROM (SELECT u.key, u.turn, u.lap FROM (
            (SELECT r.key, r.turn, 0 AS lap FROM celery_rs_fair_ring r
                WHERE r.queue = p_queue AND r.turn >= stored_front AND r.turn < stored_top
                ORDER BY r.turn LIMIT p_visits)
            UNION ALL
            (SELECT r.key, r.turn, 1 AS lap FROM celery_rs_fair_ring r WHERE r.queue = p_queue AND r.turn < stored_front
                ORDER BY r.turn LIMIT p_visits)
            UNION ALL
            (SELECT r.key, r.turn, 2 AS lap FROM celery_rs_fair_ring r
                WHERE r.queue = p_queue AND r.turn >= greatest(stored_front, stored_top)
                ORDER BY r.turn LIMIT p_visits)) u
        ORDER BY u.lap, u.turn LIMIT p_visits) k;
    m := coalesce(cardinality(ring_keys), 0);
    IF m > 0 THEN
        -- A credit is the rest of the turn of the key the front stopped at: only that key (the
        -- same turn) takes it; one that left the ring takes it along.
        first_credit := CASE WHEN stored > 0 AND ring_turns[1] = stored_front THEN least(stored, ring_w[1])
            ELSE ring_w[1] END;
        cnt := array_fill(0, ARRAY[m]);
        live := array_fill(true, ARRAY[m]);
        lp := array_fill(NULL::smallint, ARRAY[m]);
        lr := array_fill(NULL::timestamptz, ARRAY[m]);
        lid := array_fill(NULL::bigint, ARRAY[m]);
        -- Rounds: the front key first gives its credit, every key then its weight in turn. Each
        -- read asks the keys that may have more for as many whole rounds as fit in what is left
        -- (all of them taken), or for one round cut at what is left (the keys after the cut are
        -- not read); rows are locked as read (FOR UPDATE SKIP LOCKED), each key read from its
        -- last row taken on, so a fetch reads about the rows it takes, not the ring.
        LOOP
            SELECT coalesce(sum(CASE WHEN r0 = 0 AND g = 1 THEN first_credit ELSE ring_w[g] END), 0),
                coalesce(sum(ring_w[g]), 0)
            INTO one_round, next_rounds
            FROM generate_series(1, m) g WHERE live[g];
            EXIT WHEN one_round = 0 OR taken >= p_n OR r0 >= p_n;
            -- Enough rounds to fill the fetch if every key has enough (the rows of a last round
            -- beyond the fetch size stay locked, not taken, until the statement commits).
            rounds := CASE WHEN one_round >= p_n - taken THEN 1
                ELSE 2 + (p_n - taken - one_round - 1) / next_rounds END;
            lim := ARRAY(SELECT CASE WHEN NOT live[g] THEN 0
                WHEN r0 = 0 AND g = 1 THEN first_credit + (rounds - 1) * ring_w[g] ELSE rounds * ring_w[g] END
                FROM generate_series(1, m) g ORDER BY g);
            reads := reads + 1;
            WITH s AS MATERIALIZED (
                SELECT r.i::integer AS i, l.id, l.priority, l.run_at
                FROM unnest(ring_keys, lim, lp, lr, lid) WITH ORDINALITY AS r(rk, rlim, rlp, rlr, rlid, i)
                CROSS JOIN LATERAL (
                    SELECT a.id, a.priority, a.run_at FROM (SELECT t.id, t.priority, t.run_at FROM celery_rs_tasks t
                        WHERE r.rk <> '' AND t.queue = p_queue AND t.fair_key = r.rk AND t.leased_until IS NULL
                            AND t.run_at <= now()
                            AND (r.rlid IS NULL OR (t.priority, t.run_at, t.id) > (r.rlp, r.rlr, r.rlid))
                        ORDER BY t.priority, t.run_at, t.id LIMIT r.rlim FOR UPDATE SKIP LOCKED) a
                    UNION ALL
                    SELECT b.id, b.priority, b.run_at FROM (SELECT t.id, t.priority, t.run_at FROM celery_rs_tasks t
                        WHERE r.rk = '' AND t.queue = p_queue AND t.leased_until IS NULL AND t.run_at <= now()
                            AND t.priority < 1000
                            AND (r.rlid IS NULL OR (t.priority, t.run_at, t.id) > (r.rlp, r.rlr, r.rlid))
                        ORDER BY t.priority, t.run_at, t.id LIMIT r.rlim FOR UPDATE SKIP LOCKED) b) l
                WHERE r.rlim > 0
                -- One round is read in turn: it stops at the fetch size (the keys after are not read).
                LIMIT CASE WHEN rounds = 1 THEN p_n - taken END),
            c AS (
                SELECT q.*, CASE WHEN r0 = 0 AND q.i = 1 THEN CASE WHEN q.p < first_credit THEN 0
                        ELSE 1 + (q.p - first_credit) / ring_w[q.i] END
                    ELSE r0 + q.p / ring_w[q.i] END AS rnd
                FROM (SELECT s.*, (row_number() OVER (PARTITION BY s.i ORDER BY s.priority, s.run_at, s.id) - 1)::integer AS p
                    FROM s) q),
            got AS (SELECT c.i, count(*)::integer AS n FROM c GROUP BY c.i),
            t AS (SELECT c.* FROM c ORDER BY c.rnd, c.i, c.p LIMIT p_n - taken),
            per AS (
                SELECT t.i, count(*)::integer AS n, (array_agg(t.priority ORDER BY t.p DESC))[1] AS plp,
                    (array_agg(t.run_at ORDER BY t.p DESC))[1] AS plr, (array_agg(t.id ORDER BY t.p DESC))[1] AS plid
                FROM t GROUP BY t.i),
            took AS (SELECT coalesce(array_agg(o.id), '{}') AS ids, coalesce(array_agg(o.i), '{}') AS i,
                coalesce(array_agg(o.rnd), '{}') AS rnd
                FROM (SELECT t.id, t.i, t.rnd FROM t ORDER BY t.rnd, t.i, t.p) o)
            -- Where each key stands is needed only if the fetch is still short after this read.
            SELECT c_ids || took.ids, c_i || took.i, c_rnd || took.rnd,
                CASE WHEN cardinality(took.ids) < p_n - taken THEN ARRAY(SELECT cnt[g] + coalesce(per.n, 0)
                    FROM generate_series(1, m) g LEFT JOIN per ON per.i = g ORDER BY g) ELSE cnt END,
                CASE WHEN cardinality(took.ids) < p_n - taken THEN ARRAY(SELECT coalesce(per.plp, lp[g])
                    FROM generate_series(1, m) g LEFT JOIN per ON per.i = g ORDER BY g) ELSE lp END,
                CASE WHEN cardinality(took.ids) < p_n - taken THEN ARRAY(SELECT coalesce(per.plr, lr[g])
                    FROM generate_series(1, m) g LEFT JOIN per ON per.i = g ORDER BY g) ELSE lr END,
                CASE WHEN cardinality(took.ids) < p_n - taken THEN ARRAY(SELECT coalesce(per.plid, lid[g])
                    FROM generate_series(1, m) g LEFT JOIN per ON per.i = g ORDER BY g) ELSE lid END,
                -- A key that gave less than asked has nothing more ready (for us) in this fetch.
                CASE WHEN cardinality(took.ids) < p_n - taken THEN ARRAY(SELECT live[g] AND coalesce(got.n, 0) >= lim[g]
                    FROM generate_series(1, m) g LEFT JOIN got ON got.i = g ORDER BY g) ELSE live END
            FROM took
            INTO c_ids, c_i, c_rnd, cnt, lp, lr, lid, live;
            taken := cardinality(c_ids);
            r0 := r0 + rounds;
        END LOOP;
        saturated := taken < p_n AND true = ANY(live);
        ids := c_ids;
        IF taken > 0 THEN
            last_i := c_i[taken];
            last_rnd := c_rnd[taken];
            allot := CASE WHEN last_i = 1 AND last_rnd = 0 THEN first_credit ELSE ring_w[last_i] END;
            served := (SELECT count(*) FROM unnest(c_i, c_rnd) AS u(i, rnd) WHERE u.i = last_i AND u.rnd = last_rnd);
            IF served < allot THEN
                -- Its turn goes on into the next fetch if it has more.
                IF ring_keys[last_i] = '' THEN
                    more := EXISTS (SELECT 1 FROM celery_rs_tasks t WHERE t.queue = p_queue AND t.leased_until IS NULL
                        AND t.run_at <= now() AND t.priority < 1000 AND t.id <> ALL(ids));
                ELSE
                    more := EXISTS (SELECT 1 FROM celery_rs_tasks t WHERE t.queue = p_queue
                        AND t.fair_key = ring_keys[last_i] AND t.leased_until IS NULL AND t.run_at <= now()
                        AND t.id <> ALL(ids));
                END IF;
            END IF;
            IF served < allot AND more THEN
                next_front := ring_turns[last_i];
                left_credit := allot - served;
            ELSE
                next_front := ring_turns[last_i] + 1;
            END IF;
        ELSE
            -- Nothing ready in the keys read (only waiting or leased tasks): past them all.
            next_front := ring_turns[m] + 1;
        END IF;
        -- The front went round (to a key served before in this pass, or one that joined during
        -- it): a new pass, of every key in the ring now.
        IF ring_laps[CASE WHEN taken > 0 THEN last_i ELSE m END] > 0 THEN
            next_top := (SELECT s.last_value + 1 FROM celery_rs_fair_turn s);
        END IF;
        -- Stopped among the keys that joined, after the keys of a pass: every key of the pass
        -- was read before them (the pass is over), so the next fetch goes on where this one's
        -- reading began (those keys, then the joiners, now members, then the keys before it). A
        -- front past the joiner would start the next pass at the lowest turn, a second turn in a
        -- row for the keys there. The joiner's credit, if any, is dropped: the key at that front
        -- is another. (With no key of a pass read, as in a new rotation, the joiners are the pass.)
        IF ring_laps[1] < 2 AND ring_laps[CASE WHEN taken > 0 THEN last_i ELSE m END] = 2 THEN
            next_front := stored_front;
            left_credit := 0;
        END IF;
        -- The keys read without a ready row whose tasks are all gone leave the ring (a fetch
        -- filled by its first read did not read the keys after its last).
        read_end := CASE WHEN taken >= p_n AND reads = 1 THEN last_i ELSE m END;
        empties := ARRAY(SELECT ring_keys[g] FROM generate_series(1, read_end) g
            WHERE ring_keys[g] <> '' AND g NOT IN (SELECT unnest(c_i)));
        IF cardinality(empties) > 0 THEN
            locked := celery_rs_fair_lock(p_queue, false);
            IF locked THEN
                DELETE FROM celery_rs_fair_ring r WHERE r.queue = p_queue AND r.key = ANY(empties)
                    AND NOT EXISTS (SELECT 1 FROM celery_rs_tasks t
                        WHERE t.queue = p_queue AND t.fair_key = r.key AND t.leased_until IS NULL)
                    AND NOT EXISTS (SELECT 1 FROM celery_rs_tasks t
                        WHERE t.queue = p_queue AND t.fair_key = r.key AND t.leased_until IS NOT NULL);
            END IF;
        END IF;
    END IF;
    -- Short, and no key read may have more: the ready rows of keys not in the ring (none is
    -- expected) or beyond the keys read (a ring longer than p_visits), oldest first.
    IF cardinality(ids) < p_n AND NOT saturated THEN
        c_ids := ARRAY(SELECT id FROM celery_rs_tasks
            WHERE queue = p_queue AND leased_until IS NULL AND run_at <= now() AND id <> ALL(ids)
            ORDER BY priority, run_at, id LIMIT p_n - cardinality(ids) FOR UPDATE SKIP LOCKED);
        IF cardinality(c_ids) > 0 THEN
            ids := ids || c_ids;
            PERFORM celery_rs_fair_join(p_queue, d.fair_key)
            FROM (SELECT DISTINCT fair_key FROM celery_rs_tasks WHERE id = ANY(c_ids) AND fair_key IS NOT NULL) d;
        ELSIF coalesce(locked, celery_rs_fair_lock(p_queue, false))
            AND NOT EXISTS (SELECT 1 FROM celery_rs_fair_ring WHERE queue = p_queue AND key <> '')
        THEN
            DELETE FROM celery_rs_fair_ring WHERE queue = p_queue;
            DELETE FROM celery_rs_fair_queues WHERE queue = p_queue;
            RETURN ids;
        END IF;
    END IF;
    IF left_credit IS DISTINCT FROM stored OR next_front IS DISTINCT FROM stored_front
        OR next_top IS DISTINCT FROM stored_top
    THEN
        UPDATE celery_rs_fair_queues SET credit = left_credit, front = next_front, top = next_top
        WHERE queue = p_queue;
    END IF;
    RETURN ids;
END $$;
-- celery_rs_fair_lock_rows is no longer called, but stays: a fetch of migration 7's body compiled
-- before this migration (a worker of the earlier version, during a rolling upgrade) calls it.
",
    },
    Migration {
        version: 9,
        name: "fair queues: the ring read on past keys without ready rows, keys dropped under their own locks, rows leased by the fetch function",
        sql: "
-- A key's lock: the stripe of the queue its name hashes to (16 a queue), taken shared by every
-- publish and transactional send of the key until it commits, tried exclusively by a fetch that
-- drops the key (a send holds a few stripes, not the whole queue's lock; at most 16 locks a queue).
CREATE OR REPLACE FUNCTION celery_rs_fair_lock_key(p_queue text, p_key text, p_shared boolean) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_shared THEN
        PERFORM pg_advisory_xact_lock_shared(hashtext('celery_rs_fair_key:' || 'celery_rs_tasks'::regclass::oid::text),
            hashtext(p_queue || '/' || (hashtext(p_key) & 15)));
        RETURN true;
    END IF;
    RETURN pg_try_advisory_xact_lock(hashtext('celery_rs_fair_key:' || 'celery_rs_tasks'::regclass::oid::text),
        hashtext(p_queue || '/' || (hashtext(p_key) & 15)));
END $$;
-- Every lock of the queue, tried (the queue's own, held shared by a transactional send of an
-- earlier version, then each stripe): the rotation itself may go.
CREATE OR REPLACE FUNCTION celery_rs_fair_lock_all(p_queue text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT celery_rs_fair_lock(p_queue, false) THEN
        RETURN false;
    END IF;
    FOR s IN 0 .. 15 LOOP
        IF NOT pg_try_advisory_xact_lock(hashtext('celery_rs_fair_key:' || 'celery_rs_tasks'::regclass::oid::text),
            hashtext(p_queue || '/' || s))
        THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END $$;
-- The keys among p_keys without any row in the queue (ready, waiting or leased), each looked up
-- by its own index probes whatever the table's statistics (a join planned without them read
-- every row of the queue per key).
CREATE OR REPLACE FUNCTION celery_rs_fair_gone(p_queue text, p_keys text[]) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(k), '{}') FROM unnest(p_keys) AS k
    WHERE (SELECT t.id FROM celery_rs_tasks t WHERE t.queue = p_queue AND t.fair_key = k AND t.leased_until IS NULL
            LIMIT 1) IS NULL
        AND (SELECT t.id FROM celery_rs_tasks t WHERE t.queue = p_queue AND t.fair_key = k
            AND t.leased_until IS NOT NULL LIMIT 1) IS NULL
$$;
CREATE OR REPLACE FUNCTION celery_rs_fair_join(p_queue text, p_key text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM celery_rs_fair_lock_key(p_queue, p_key, true);
    -- No pre-check (a caller's REPEATABLE READ snapshot may still see a row a fetch deleted):
    -- ON CONFLICT looks at the committed rows.
    INSERT INTO celery_rs_fair_queues (queue) VALUES (p_queue) ON CONFLICT DO NOTHING;
    INSERT INTO celery_rs_fair_ring (queue, key, turn) VALUES (p_queue, p_key, nextval('celery_rs_fair_turn'))
    ON CONFLICT DO NOTHING;
    INSERT INTO celery_rs_fair_ring (queue, key, turn) VALUES (p_queue, '', nextval('celery_rs_fair_turn'))
    ON CONFLICT DO NOTHING;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_fair_forget(p_queue text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE gone text[];
BEGIN
    -- The queue's row first, then its locks: the order a fair fetch takes them in.
    PERFORM 1 FROM celery_rs_fair_queues WHERE queue = p_queue FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Tried, never waited for: a send in an open transaction keeps its keys (a later fetch
    -- drops them once they are empty).
    IF NOT celery_rs_fair_lock(p_queue, false) THEN
        RETURN;
    END IF;
    gone := celery_rs_fair_gone(p_queue,
        ARRAY(SELECT r.key FROM celery_rs_fair_ring r WHERE r.queue = p_queue AND r.key <> ''));
    gone := ARRAY(SELECT g FROM unnest(gone) AS g WHERE celery_rs_fair_lock_key(p_queue, g, false));
    -- Read again under the locks.
    DELETE FROM celery_rs_fair_ring r WHERE r.queue = p_queue AND r.key = ANY(celery_rs_fair_gone(p_queue, gone));
    IF NOT EXISTS (SELECT 1 FROM celery_rs_fair_ring WHERE queue = p_queue AND key <> '') THEN
        IF celery_rs_fair_lock_all(p_queue) THEN
            IF NOT EXISTS (SELECT 1 FROM celery_rs_fair_ring WHERE queue = p_queue AND key <> '') THEN
                DELETE FROM celery_rs_fair_ring WHERE queue = p_queue;
                DELETE FROM celery_rs_fair_queues WHERE queue = p_queue;
            END IF;
        END IF;
    END IF;
END $$;
CREATE OR REPLACE FUNCTION celery_rs_fair_next(p_queue text, p_n integer, p_keys text[], p_weights integer[],
    p_visits integer) RETURNS bigint[]
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    stored integer;
    stored_front bigint;
    stored_top bigint;
    ring_keys text[];
    ring_turns bigint[];
    -- 0: in this pass, at or after the front; 1: in this pass, before the front (served in it);
    -- 2: joined during this pass (at or after top).
    ring_laps integer[];
    ring_w integer[];
    m integer;
    first_credit integer;
    -- Per key read: rows asked by this read, rows taken so far, its last row taken (where the
    -- next read of it starts), and whether it gave all it was asked so far (it may have more);
    -- brought up to date only while the fetch is still short.
    lim integer[];
    cnt integer[];
    lp smallint[];
    lr timestamptz[];
    lid bigint[];
    live boolean[];
    r0 integer := 0;
    rounds integer;
    one_round integer;
    next_rounds integer;
    reads integer := 0;
    c_ids bigint[] := '{}';
    c_i integer[] := '{}';
    c_rnd integer[] := '{}';
    saturated boolean := false;
    read_end integer;
    empties text[];
    ids bigint[] := '{}';
    taken integer := 0;
    last_i integer;
    last_rnd integer;
    allot integer;
    served integer := 0;
    more boolean := false;
    next_front bigint;
    next_top bigint;
    left_credit integer := 0;
    -- Across the windows of the ring read by this fetch (each of at most p_visits keys from the
    -- front the window before left): what the fetch took, and where it started.
    want integer;
    windows integer := 0;
    all_ids bigint[] := '{}';
    first_stored integer;
    first_front bigint;
    first_top bigint;
    -- Whether no fair lock of the queue is held shared (by a transactional send of an earlier
    -- version, which does not name its keys): NULL until tried.
    free boolean;
    gone text[];
BEGIN
    SELECT s.credit, s.front, s.top INTO stored, stored_front, stored_top
    FROM celery_rs_fair_queues s WHERE s.queue = p_queue FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    first_stored := stored;
    first_front := stored_front;
    first_top := stored_top;
    next_front := stored_front;
    next_top := stored_top;
    -- A window of the ring that gives nothing (its keys only wait for an eta, are leased, or ran
    -- out) moves the front past it, and the fetch reads on from there, as the next fetch would,
    -- up to 16 windows: a fetch takes the queue's oldest rows regardless of keys only when the
    -- whole ring was read, or that many windows were, and it is still short.
    LOOP
    windows := windows + 1;
    want := p_n - cardinality(all_ids);
    ids := '{}';
    c_ids := '{}';
    c_i := '{}';
    c_rnd := '{}';
    r0 := 0;
    reads := 0;
    taken := 0;
    saturated := false;
    served := 0;
    more := false;
    left_credit := 0;
    -- The ring in turn from its front. A pass is the keys whose turn is below top (the sequence's
    -- value when the pass began): those at or after the front, then (round the ring) those before
    -- it, served in this pass already; the keys that joined during the pass (their turn at or
    -- after top, from the sequence) come last, behind every key already waiting, and become
    -- members when the front wraps round. Serving a key moves the front past it: no ring row is
    -- rewritten.
    SELECT array_agg(k.key ORDER BY k.lap, k.turn), array_agg(k.turn ORDER BY k.lap, k.turn),
        array_agg(k.lap ORDER BY k.lap, k.turn),
        array_agg(coalesce(p_weights[array_position(p_keys, k.key)], 1) ORDER BY k.lap, k.turn)
    INTO ring_keys, ring_turns, ring_laps, ring_w
    FROM (SELECT u.key, u.turn, u.lap FROM (
            (SELECT r.key, r.turn, 0 AS lap FROM celery_rs_fair_ring r
                WHERE r.queue = p_queue AND r.turn >= stored_front AND r.turn < stored_top
                ORDER BY r.turn LIMIT p_visits)
            UNION ALL
            (SELECT r.key, r.turn, 1 AS lap FROM celery_rs_fair_ring r WHERE r.queue = p_queue AND r.turn < stored_front
                ORDER BY r.turn LIMIT p_visits)
            UNION ALL
            (SELECT r.key, r.turn, 2 AS lap FROM celery_rs_fair_ring r
                WHERE r.queue = p_queue AND r.turn >= greatest(stored_front, stored_top)
                ORDER BY r.turn LIMIT p_visits)) u
        ORDER BY u.lap, u.turn LIMIT p_visits) k;
    m := coalesce(cardinality(ring_keys), 0);
    IF m > 0 THEN
        -- A credit is the rest of the turn of the key the front stopped at: only that key (the
        -- same turn) takes it; one that left the ring takes it along.
        first_credit := CASE WHEN stored > 0 AND ring_turns[1] = stored_front THEN least(stored, ring_w[1])
            ELSE ring_w[1] END;
        cnt := array_fill(0, ARRAY[m]);
        live := array_fill(true, ARRAY[m]);
        lp := array_fill(NULL::smallint, ARRAY[m]);
        lr := array_fill(NULL::timestamptz, ARRAY[m]);
        lid := array_fill(NULL::bigint, ARRAY[m]);
        -- Rounds: the front key first gives its credit, every key then its weight in turn. Each
        -- read asks the keys that may have more for as many whole rounds as fit in what is left
        -- (all of them taken), or for one round cut at what is left (the keys after the cut are
        -- not read); rows are locked as read (FOR UPDATE SKIP LOCKED), each key read from its
        -- last row taken on, so a fetch reads about the rows it takes, not the ring.
        LOOP
            SELECT coalesce(sum(CASE WHEN r0 = 0 AND g = 1 THEN first_credit ELSE ring_w[g] END), 0),
                coalesce(sum(ring_w[g]), 0)
            INTO one_round, next_rounds
            FROM generate_series(1, m) g WHERE live[g];
            EXIT WHEN one_round = 0 OR taken >= want OR r0 >= want;
            -- Enough rounds to fill the fetch if every key has enough (the rows of a last round
            -- beyond the fetch size stay locked, not taken, until the statement commits).
            rounds := CASE WHEN one_round >= want - taken THEN 1
                ELSE 2 + (want - taken - one_round - 1) / next_rounds END;
            lim := ARRAY(SELECT CASE WHEN NOT live[g] THEN 0
                WHEN r0 = 0 AND g = 1 THEN first_credit + (rounds - 1) * ring_w[g] ELSE rounds * ring_w[g] END
                FROM generate_series(1, m) g ORDER BY g);
            reads := reads + 1;
            WITH s AS MATERIALIZED (
                SELECT r.i::integer AS i, l.id, l.priority, l.run_at
                FROM unnest(ring_keys, lim, lp, lr, lid) WITH ORDINALITY AS r(rk, rlim, rlp, rlr, rlid, i)
                CROSS JOIN LATERAL (
                    SELECT a.id, a.priority, a.run_at FROM (SELECT t.id, t.priority, t.run_at FROM celery_rs_tasks t
                        WHERE r.rk <> '' AND t.queue = p_queue AND t.fair_key = r.rk AND t.leased_until IS NULL
                            AND t.run_at <= now() AND t.id <> ALL(all_ids)
                            AND (r.rlid IS NULL OR (t.priority, t.run_at, t.id) > (r.rlp, r.rlr, r.rlid))
                        ORDER BY t.priority, t.run_at, t.id LIMIT r.rlim FOR UPDATE SKIP LOCKED) a
                    UNION ALL
                    SELECT b.id, b.priority, b.run_at FROM (SELECT t.id, t.priority, t.run_at FROM celery_rs_tasks t
                        WHERE r.rk = '' AND t.queue = p_queue AND t.leased_until IS NULL AND t.run_at <= now()
                            AND t.priority < 1000 AND t.id <> ALL(all_ids)
                            AND (r.rlid IS NULL OR (t.priority, t.run_at, t.id) > (r.rlp, r.rlr, r.rlid))
                        ORDER BY t.priority, t.run_at, t.id LIMIT r.rlim FOR UPDATE SKIP LOCKED) b) l
                WHERE r.rlim > 0
                -- One round is read in turn: it stops at the fetch size (the keys after are not read).
                LIMIT CASE WHEN rounds = 1 THEN want - taken END),
            c AS (
                SELECT q.*, CASE WHEN r0 = 0 AND q.i = 1 THEN CASE WHEN q.p < first_credit THEN 0
                        ELSE 1 + (q.p - first_credit) / ring_w[q.i] END
                    ELSE r0 + q.p / ring_w[q.i] END AS rnd
                FROM (SELECT s.*, (row_number() OVER (PARTITION BY s.i ORDER BY s.priority, s.run_at, s.id) - 1)::integer AS p
                    FROM s) q),
            got AS (SELECT c.i, count(*)::integer AS n FROM c GROUP BY c.i),
            t AS (SELECT c.* FROM c ORDER BY c.rnd, c.i, c.p LIMIT want - taken),
            per AS (
                SELECT t.i, count(*)::integer AS n, (array_agg(t.priority ORDER BY t.p DESC))[1] AS plp,
                    (array_agg(t.run_at ORDER BY t.p DESC))[1] AS plr, (array_agg(t.id ORDER BY t.p DESC))[1] AS plid
                FROM t GROUP BY t.i),
            took AS (SELECT coalesce(array_agg(o.id), '{}') AS ids, coalesce(array_agg(o.i), '{}') AS i,
                coalesce(array_agg(o.rnd), '{}') AS rnd
                FROM (SELECT t.id, t.i, t.rnd FROM t ORDER BY t.rnd, t.i, t.p) o)
            -- Where each key stands is needed only if the fetch is still short after this read.
            SELECT c_ids || took.ids, c_i || took.i, c_rnd || took.rnd,
                CASE WHEN cardinality(took.ids) < want - taken THEN ARRAY(SELECT cnt[g] + coalesce(per.n, 0)
                    FROM generate_series(1, m) g LEFT JOIN per ON per.i = g ORDER BY g) ELSE cnt END,
                CASE WHEN cardinality(took.ids) < want - taken THEN ARRAY(SELECT coalesce(per.plp, lp[g])
                    FROM generate_series(1, m) g LEFT JOIN per ON per.i = g ORDER BY g) ELSE lp END,
                CASE WHEN cardinality(took.ids) < want - taken THEN ARRAY(SELECT coalesce(per.plr, lr[g])
                    FROM generate_series(1, m) g LEFT JOIN per ON per.i = g ORDER BY g) ELSE lr END,
                CASE WHEN cardinality(took.ids) < want - taken THEN ARRAY(SELECT coalesce(per.plid, lid[g])
                    FROM generate_series(1, m) g LEFT JOIN per ON per.i = g ORDER BY g) ELSE lid END,
                -- A key that gave less than asked has nothing more ready (for us) in this fetch.
                CASE WHEN cardinality(took.ids) < want - taken THEN ARRAY(SELECT live[g] AND coalesce(got.n, 0) >= lim[g]
                    FROM generate_series(1, m) g LEFT JOIN got ON got.i = g ORDER BY g) ELSE live END
            FROM took
            INTO c_ids, c_i, c_rnd, cnt, lp, lr, lid, live;
            taken := cardinality(c_ids);
            r0 := r0 + rounds;
        END LOOP;
        saturated := taken < want AND true = ANY(live);
        ids := c_ids;
        IF taken > 0 THEN
            last_i := c_i[taken];
            last_rnd := c_rnd[taken];
            allot := CASE WHEN last_i = 1 AND last_rnd = 0 THEN first_credit ELSE ring_w[last_i] END;
            served := (SELECT count(*) FROM unnest(c_i, c_rnd) AS u(i, rnd) WHERE u.i = last_i AND u.rnd = last_rnd);
            IF served < allot THEN
                -- Its turn goes on into the next fetch if it has more.
                IF ring_keys[last_i] = '' THEN
                    more := EXISTS (SELECT 1 FROM celery_rs_tasks t WHERE t.queue = p_queue AND t.leased_until IS NULL
                        AND t.run_at <= now() AND t.priority < 1000 AND t.id <> ALL(all_ids || ids));
                ELSE
                    more := EXISTS (SELECT 1 FROM celery_rs_tasks t WHERE t.queue = p_queue
                        AND t.fair_key = ring_keys[last_i] AND t.leased_until IS NULL AND t.run_at <= now()
                        AND t.id <> ALL(all_ids || ids));
                END IF;
            END IF;
            IF served < allot AND more THEN
                next_front := ring_turns[last_i];
                left_credit := allot - served;
            ELSE
                next_front := ring_turns[last_i] + 1;
            END IF;
        ELSE
            -- Nothing ready in the keys read (only waiting or leased tasks): past them all.
            next_front := ring_turns[m] + 1;
        END IF;
        -- The front went round (to a key served before in this pass, or one that joined during
        -- it): a new pass, of every key in the ring now.
        IF ring_laps[CASE WHEN taken > 0 THEN last_i ELSE m END] > 0 THEN
            next_top := (SELECT s.last_value + 1 FROM celery_rs_fair_turn s);
        END IF;
        -- Stopped among the keys that joined, after the keys of a pass: every key of the pass
        -- was read before them (the pass is over), so the next fetch goes on where this one's
        -- reading began (those keys, then the joiners, now members, then the keys before it). A
        -- front past the joiner would start the next pass at the lowest turn, a second turn in a
        -- row for the keys there. The joiner's credit, if any, is dropped: the key at that front
        -- is another. (With no key of a pass read, as in a new rotation, the joiners are the pass.)
        IF ring_laps[1] < 2 AND ring_laps[CASE WHEN taken > 0 THEN last_i ELSE m END] = 2 THEN
            next_front := stored_front;
            left_credit := 0;
        END IF;
        -- The keys read without a ready row whose tasks are all gone leave the ring (a fetch
        -- filled by its first read did not read the keys after its last).
        read_end := CASE WHEN taken >= want AND reads = 1 THEN last_i ELSE m END;
        empties := ARRAY(SELECT ring_keys[g] FROM generate_series(1, read_end) g
            WHERE ring_keys[g] <> '' AND g NOT IN (SELECT unnest(c_i)));
        -- Each under its key's lock (of the key's stripe of the queue, taken shared by a publish
        -- or transactional send of the key until it commits), tried, never waited for: a send
        -- that holds one keeps only the keys of its stripe, not every key of the queue.
        IF cardinality(empties) > 0 THEN
            gone := celery_rs_fair_gone(p_queue, empties);
            IF cardinality(gone) > 0 THEN
                IF free IS NULL THEN
                    free := celery_rs_fair_lock(p_queue, false);
                END IF;
                IF free THEN
                    gone := ARRAY(SELECT e FROM unnest(gone) AS e WHERE celery_rs_fair_lock_key(p_queue, e, false));
                    -- Read again under the locks.
                    DELETE FROM celery_rs_fair_ring r
                    WHERE r.queue = p_queue AND r.key = ANY(celery_rs_fair_gone(p_queue, gone));
                END IF;
            END IF;
        END IF;
    END IF;
    all_ids := all_ids || ids;
    -- Read on from the new front while short, no key read may have more, the ring goes on past
    -- the window (it was not read whole), the window did not go round the ring (its last key is
    -- one at or after the front: past that, the next window reads keys read already) and no key keeps a credit. (The rows
    -- this fetch took are locked by it, which SKIP LOCKED does not skip: the reads above leave
    -- them out by id.)
    EXIT WHEN cardinality(all_ids) >= p_n OR saturated OR m < p_visits OR left_credit > 0 OR windows >= 16
        OR ring_laps[m] > 0
        OR (next_front = stored_front AND next_top = stored_top);
    stored := 0;
    stored_front := next_front;
    stored_top := next_top;
    END LOOP;
    ids := all_ids;
    -- Short, and no key read may have more: the ready rows of keys not in the ring (none is
    -- expected) or beyond the keys read (a ring longer than p_visits), oldest first.
    IF cardinality(ids) < p_n AND NOT saturated THEN
        c_ids := ARRAY(SELECT id FROM celery_rs_tasks
            WHERE queue = p_queue AND leased_until IS NULL AND run_at <= now() AND id <> ALL(ids)
            ORDER BY priority, run_at, id LIMIT p_n - cardinality(ids) FOR UPDATE SKIP LOCKED);
        IF cardinality(c_ids) > 0 THEN
            ids := ids || c_ids;
            PERFORM celery_rs_fair_join(p_queue, d.fair_key)
            FROM (SELECT DISTINCT fair_key FROM celery_rs_tasks WHERE id = ANY(c_ids) AND fair_key IS NOT NULL) d;
        ELSIF NOT EXISTS (SELECT 1 FROM celery_rs_fair_ring WHERE queue = p_queue AND key <> '') THEN
            -- No keyed row left: the rotation goes, under every lock of the queue (the ring
            -- read again once they are held).
            IF celery_rs_fair_lock_all(p_queue) THEN
                IF NOT EXISTS (SELECT 1 FROM celery_rs_fair_ring WHERE queue = p_queue AND key <> '') THEN
                    DELETE FROM celery_rs_fair_ring WHERE queue = p_queue;
                    DELETE FROM celery_rs_fair_queues WHERE queue = p_queue;
                    RETURN ids;
                END IF;
            END IF;
        END IF;
    END IF;
    IF left_credit IS DISTINCT FROM first_stored OR next_front IS DISTINCT FROM first_front
        OR next_top IS DISTINCT FROM first_top
    THEN
        UPDATE celery_rs_fair_queues SET credit = left_credit, front = next_front, top = next_top
        WHERE queue = p_queue;
    END IF;
    RETURN ids;
END $$;
-- Migration 8's name, as a fetch compiled before this migration calls it (that fetch leases the
-- rows itself, on its statement's snapshot).
CREATE OR REPLACE FUNCTION celery_rs_fair_pick(p_queue text, p_n integer, p_keys text[], p_weights integer[],
    p_visits integer) RETURNS bigint[]
LANGUAGE sql VOLATILE AS $$
    SELECT celery_rs_fair_next(p_queue, p_n, p_keys, p_weights, p_visits)
$$;
-- Picks (celery_rs_fair_next) and leases, in statements of its own: a row committed while the
-- pick waited for the queue's row is picked and leased alike (a lease by the calling statement,
-- on the snapshot it began with, would miss it: locked, its key's turn counted, not leased).
-- The rows in the order picked; none: one row of NULLs but o_fair (false: no rotation).
CREATE OR REPLACE FUNCTION celery_rs_fair_take(p_queue text, p_n integer, p_secs double precision, p_cap bigint,
    p_holder text, p_keys text[], p_weights integer[], p_visits integer)
RETURNS TABLE (o_queue text, o_id bigint, o_deliveries integer, o_priority smallint, o_run_at timestamptz,
    o_size bigint, o_payload bytea, o_task_id text, o_dlq text, o_reason text, o_fair boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE ids bigint[];
BEGIN
    ids := celery_rs_fair_next(p_queue, p_n, p_keys, p_weights, p_visits);
    -- Each row once, in the order picked (the pick never gives one twice; a lease must not either).
    IF ids IS NOT NULL THEN
        ids := ARRAY(SELECT u.id FROM unnest(ids) WITH ORDINALITY AS u(id, n) GROUP BY u.id ORDER BY min(u.n));
    END IF;
    RETURN QUERY WITH l (lq, lid, ld, lp, lr, ls, lpay, ltid, ldlq, lreason) AS (
        UPDATE celery_rs_tasks t
        SET leased_until = CASE WHEN octet_length(t.payload) > p_cap THEN NULL
                ELSE now() + make_interval(secs => p_secs) END,
            holder = CASE WHEN octet_length(t.payload) > p_cap THEN NULL ELSE p_holder END,
            deliveries = t.deliveries + 1,
            queue = CASE WHEN octet_length(t.payload) > p_cap THEN t.queue || '.dead' ELSE t.queue END,
            reason = CASE WHEN octet_length(t.payload) > p_cap
                THEN 'message of ' || octet_length(t.payload) || ' bytes exceeds the limit of ' || p_cap || ' bytes'
                ELSE t.reason END,
            run_at = CASE WHEN octet_length(t.payload) > p_cap THEN now() ELSE t.run_at END,
            priority = CASE WHEN octet_length(t.payload) > p_cap THEN 0 ELSE t.priority END,
            fair_key = CASE WHEN octet_length(t.payload) > p_cap THEN NULL ELSE t.fair_key END
        WHERE t.id = ANY(ids)
        RETURNING CASE WHEN t.leased_until IS NULL THEN left(t.queue, -length('.dead')) ELSE t.queue END,
            t.id, t.deliveries, t.priority, t.run_at, octet_length(t.payload)::bigint,
            CASE WHEN t.leased_until IS NULL THEN NULL ELSE t.payload END,
            CASE WHEN t.leased_until IS NULL THEN celery_rs_task_id(t.payload) END,
            CASE WHEN t.leased_until IS NULL THEN t.queue END,
            CASE WHEN t.leased_until IS NULL THEN NULL ELSE t.reason END)
    SELECT l.lq, l.lid, l.ld, l.lp, l.lr, l.ls, l.lpay, l.ltid, l.ldlq, l.lreason, true
    FROM unnest(ids) WITH ORDINALITY AS u(id, n) JOIN l ON l.lid = u.id ORDER BY u.n;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::text, NULL::bigint, NULL::integer, NULL::smallint, NULL::timestamptz, NULL::bigint,
            NULL::bytea, NULL::text, NULL::text, NULL::text, ids IS NOT NULL;
    END IF;
END $$;
-- celery_rs_fair_pick (migration 8's name) stays for the fetches compiled before this migration.
",
    },
];

/// The two notification channels of the current schema: `(tasks, broadcasts)`. Channels are
/// database-wide, so they carry a digest of the schema's name: brokers in other schemas of the
/// same database never wake each other.
pub(crate) const CHANNELS: &str = "SELECT 'celery_rs_t_' || left(md5(coalesce(current_schema(), '')), 16), \
     'celery_rs_b_' || left(md5(coalesce(current_schema(), '')), 16)";

/// Inserts messages: `$1` queues, `$2` priorities, `$3` etas (NULL: now), `$4` payloads; notifies
/// `$5` once per queue (the payload is the queue's name).
pub(crate) const PUBLISH: &str = "
WITH ins AS (
    INSERT INTO celery_rs_tasks (queue, priority, run_at, payload)
    SELECT q, p, greatest(now(), coalesce(r, now())), b
    FROM unnest($1::text[], $2::smallint[], $3::timestamptz[], $4::bytea[]) AS u(q, p, r, b)
    RETURNING queue)
SELECT pg_notify($5, q) FROM (SELECT DISTINCT queue AS q FROM ins) d";

/// Inserts messages as [`PUBLISH`] does, with fairness keys `$5` (NULL where a message has
/// none), notifying `$6`: a keyed message's queue joins the fair queues (`celery_rs_fair_queues`)
/// and its key the queue's ring (as does `""`, the queue's unkeyed messages), under the queue's
/// shared fair lock; it is stored with its priority plus 1,000 (see the module doc), and its queue is
/// notified as `\u{6}<queue>` (the consumers switch that queue to [`FAIR_FETCH`]).
pub(crate) const FAIR_PUBLISH: &str = "SELECT celery_rs_fair_publish($1, $2, $3, $4, $5, $6)";

/// [`FAIR_PUBLISH`] without the join: the transaction holds its queues' shared fair locks
/// ([`FAIR_LOCK_SHARED`]) and the keys joined on a connection of their own ([`FAIR_JOIN`]).
pub(crate) const FAIR_PUBLISH_JOINED: &str = "SELECT celery_rs_fair_publish($1, $2, $3, $4, $5, $6, false)";

/// Takes the shared fair lock of each of keys `$2` in queue `$1` (pairwise, in order; the lock of
/// the key's stripe of the queue, migration 9) until the transaction ends: no fetch drops one of
/// these keys meanwhile (the other keys of the queue may go).
pub(crate) const FAIR_LOCK_SHARED: &str = "SELECT celery_rs_fair_lock_key(d.q, d.k, true) \
     FROM (SELECT DISTINCT q, k FROM unnest($1::text[], $2::text[]) AS u(q, k) ORDER BY q, k) d";

/// Joins keys `$2` to the rotations of queues `$1` (pairwise, each pair once), as a keyed publish
/// does, in a statement of its own (committed before a transactional send inserts its rows).
pub(crate) const FAIR_JOIN: &str = "SELECT celery_rs_fair_join(d.q, d.k) \
     FROM (SELECT DISTINCT q, k FROM unnest($1::text[], $2::text[]) AS u(q, k) ORDER BY q, k) d";

/// The payload prefix of a notification that marks its queue fair (see [`FAIR_PUBLISH`]).
pub(crate) const FAIR_NOTE: char = '\u{6}';

/// The queues among `$1` that are fair (have a rotation).
pub(crate) const FAIR_QUEUES: &str = "SELECT queue FROM celery_rs_fair_queues WHERE queue = ANY($1)";

/// After a purge of queue `$1`: drops the keys of its ring left without any message, and the
/// rotation itself when no keyed one is left (under the queue's fair lock).
pub(crate) const FAIR_FORGET: &str = "SELECT celery_rs_fair_forget($1)";

/// The update that leases the rows of the CTE `picked` (`$3` seconds, `$4` the largest payload
/// read, `$5` the holder), of [`FETCH`] (migration 9's `celery_rs_fair_take` leases alike); see
/// [`FETCH`] for what it returns.
macro_rules! lease_picked {
    () => {
        "UPDATE celery_rs_tasks t
SET leased_until = CASE WHEN octet_length(t.payload) > $4::bigint THEN NULL ELSE now() + make_interval(secs => $3) END,
    holder = CASE WHEN octet_length(t.payload) > $4::bigint THEN NULL ELSE $5::text END,
    deliveries = t.deliveries + 1,
    queue = CASE WHEN octet_length(t.payload) > $4::bigint THEN t.queue || '.dead' ELSE t.queue END,
    reason = CASE WHEN octet_length(t.payload) > $4::bigint
        THEN 'message of ' || octet_length(t.payload) || ' bytes exceeds the limit of ' || $4::bigint || ' bytes'
        ELSE t.reason END,
    run_at = CASE WHEN octet_length(t.payload) > $4::bigint THEN now() ELSE t.run_at END,
    priority = CASE WHEN octet_length(t.payload) > $4::bigint THEN 0 ELSE t.priority END,
    fair_key = CASE WHEN octet_length(t.payload) > $4::bigint THEN NULL ELSE t.fair_key END
WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
RETURNING CASE WHEN t.leased_until IS NULL THEN left(t.queue, -length('.dead')) ELSE t.queue END,
    t.id, t.deliveries, t.priority, t.run_at, octet_length(t.payload)::bigint,
    CASE WHEN t.leased_until IS NULL THEN NULL ELSE t.payload END,
    CASE WHEN t.leased_until IS NULL THEN celery_rs_task_id(t.payload) END,
    CASE WHEN t.leased_until IS NULL THEN t.queue END,
    CASE WHEN t.leased_until IS NULL THEN NULL ELSE t.reason END"
    };
}

/// Leases ready messages of several queues in one statement, for `$3` seconds to holder `$5`:
/// queue `$1[i]` gives at most `$2[i]` (its share), by priority then age, and all of them together
/// at most `$6`, taken in the order of `$1` (the queues are looked at one after the other, each
/// through the ready index, and the look stops once `$6` rows are taken: the queues after that
/// are not looked at). A message whose payload is larger than `$4` bytes moves to `<queue>.dead`
/// unread, with the reason. Returns `queue taken from, id, deliveries, priority, run_at, size,
/// payload (NULL when too large), the task id of one too large, its dead-letter queue, the reason
/// of a dead letter` (in no order: the caller sorts). A row the statement dead-lettered is the one
/// it left without a lease.
///
/// The rows to update are found by id through the primary key (`= ANY` of the ids picked), so
/// the update never walks the table between the picked ids (as a merge join of the picked rows
/// with the whole table would).
pub(crate) const FETCH: &str = concat!(
    "
WITH picked AS (
    SELECT c.id FROM unnest($1::text[], $2::bigint[]) AS q(queue, share)
    CROSS JOIN LATERAL (
        SELECT id FROM celery_rs_tasks
        WHERE queue = q.queue AND leased_until IS NULL AND run_at <= now()
        ORDER BY priority, run_at, id
        LIMIT q.share
        FOR UPDATE SKIP LOCKED) c
    LIMIT $6)
",
    lease_picked!()
);

/// Leases up to `$2` ready messages of fair queue `$1`, its keys taking turns by weights `$7`
/// (of keys `$6`; 1 when not named) and at most `$8` keys of its ring read at a time (migration
/// 9's `celery_rs_fair_take`: it picks, then leases in a statement of its own, so a row committed
/// while the pick waited for the queue's row is leased too), as [`FETCH`] leases (`$3` to `$5`
/// alike): the same columns, then whether the queue is still fair (false: it has no rotation any
/// more, fetch it with [`FETCH`]), in the order the keys' turns picked them. When nothing was
/// leased, one row with NULLs but the last column. Public for the tests.
pub const FAIR_FETCH: &str = "SELECT o_queue, o_id, o_deliveries, o_priority, o_run_at, o_size, o_payload, o_task_id, \
     o_dlq, o_reason, o_fair FROM celery_rs_fair_take($1::text, $2::integer, $3::float8, $4::bigint, $5::text, \
     $6::text[], $7::integer[], $8::integer)";

/// Wakes the consumers of queue `$2` (on channel `$1`).
pub(crate) const WAKE: &str = "SELECT pg_notify($1, $2)";

/// Seconds until the next message of queues `$1` that waits for its eta is due (NULL: none).
pub(crate) const NEXT_DUE: &str = "
SELECT extract(epoch FROM min(run_at) - now())::float8 FROM celery_rs_tasks
WHERE queue = ANY($1) AND leased_until IS NULL";

/// Extends the leases `$1` (ids) with fencing tokens `$2` (deliveries) by `$3` seconds.
pub(crate) const RENEW: &str = "
UPDATE celery_rs_tasks t SET leased_until = now() + make_interval(secs => $3)
FROM unnest($1::bigint[], $2::integer[]) AS l(id, deliveries)
WHERE t.id = l.id AND t.deliveries = l.deliveries AND t.leased_until IS NOT NULL";

/// Deletes the acked messages `$1` (ids) still holding tokens `$2` under a lease (taken again by
/// another consumer, a row has a new token and stays; returned to its queue, it runs again).
pub(crate) const ACK: &str = "
DELETE FROM celery_rs_tasks t USING unnest($1::bigint[], $2::integer[]) AS l(id, deliveries)
WHERE t.id = l.id AND t.deliveries = l.deliveries AND t.leased_until IS NOT NULL";

/// Whether message `$1` is still leased under token `$2`.
pub(crate) const HELD: &str = "
SELECT EXISTS (SELECT 1 FROM celery_rs_tasks WHERE id = $1 AND deliveries = $2 AND leased_until IS NOT NULL)";

/// The heartbeat of worker `$1`: `<nonce> <alive_until>` (as text) when it has a row.
pub(crate) const WORKER_SEEN: &str = "SELECT nonce || ' ' || alive_until::text FROM celery_rs_workers WHERE name = $1";

/// Renews worker `$1`'s heartbeat (nonce `$2`) to now + `$3` seconds. Returns 1 when its row was
/// alive and its own; 0 when it had expired or was gone (set again: what it held may have been
/// returned meanwhile); -1 when another live process holds the name (not touched).
pub(crate) const HEARTBEAT: &str = "
WITH prev AS (SELECT nonce = $2 AND alive_until >= now() AS ok FROM celery_rs_workers WHERE name = $1),
up AS (
    INSERT INTO celery_rs_workers (name, nonce, alive_until) VALUES ($1, $2, now() + make_interval(secs => $3))
    ON CONFLICT (name) DO UPDATE SET nonce = EXCLUDED.nonce, alive_until = EXCLUDED.alive_until
    WHERE celery_rs_workers.nonce = EXCLUDED.nonce OR celery_rs_workers.alive_until < now()
    RETURNING 1)
SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM up) THEN -1
            WHEN coalesce((SELECT ok FROM prev), false) THEN 1 ELSE 0 END";

/// A worker's start: when worker `$1`'s `<nonce> <alive_until>` still reads `$4` (`''`: no row), returns
/// what an earlier run under that name held to its queues (notifying `$5`), and sets the heartbeat
/// (nonce `$2`, `$3` seconds). Returns `(registered, returned)`: registered is 0 when the row
/// changed meanwhile (another live process renews it).
pub(crate) const CLAIM: &str = "
WITH cur AS (SELECT coalesce((SELECT nonce || ' ' || alive_until::text FROM celery_rs_workers WHERE name = $1), '') = $4 AS ok),
back AS (
    UPDATE celery_rs_tasks SET leased_until = NULL, holder = NULL
    WHERE holder = $1 AND leased_until IS NOT NULL AND (SELECT ok FROM cur)
    RETURNING queue),
up AS (
    INSERT INTO celery_rs_workers (name, nonce, alive_until)
    SELECT $1, $2, now() + make_interval(secs => $3) WHERE (SELECT ok FROM cur)
    ON CONFLICT (name) DO UPDATE SET nonce = EXCLUDED.nonce, alive_until = EXCLUDED.alive_until
    RETURNING 1),
notes AS (SELECT pg_notify($5, q) FROM (SELECT DISTINCT queue AS q FROM back) d)
SELECT (SELECT count(*) FROM up), (SELECT count(*) FROM back), (SELECT count(*) FROM notes)";

/// Deletes the rows of workers whose heartbeat expired and returns what they held to their
/// queues, in one statement (concurrent sweepers: each row is deleted, and its tasks returned,
/// once); notifies `$1` per queue. Returns `(queue notified, count)` per queue.
pub(crate) const RESTORE_DEAD: &str = "
WITH dead AS (DELETE FROM celery_rs_workers WHERE alive_until < now() RETURNING name),
back AS (
    UPDATE celery_rs_tasks SET leased_until = NULL, holder = NULL
    WHERE holder IN (SELECT name FROM dead) AND leased_until IS NOT NULL
    RETURNING queue)
SELECT pg_notify($1, q), n FROM (SELECT queue AS q, count(*) AS n FROM back GROUP BY queue) d";

/// Returns up to `$2` messages whose lease expired to their queues; notifies `$1` per queue.
pub(crate) const RESTORE: &str = "
WITH back AS (
    UPDATE celery_rs_tasks SET leased_until = NULL
    WHERE id IN (SELECT id FROM celery_rs_tasks WHERE leased_until < now()
                 ORDER BY leased_until LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING queue)
SELECT pg_notify($1, q), n FROM (SELECT queue AS q, count(*) AS n FROM back GROUP BY queue) d";

/// Gives message `$1` (token `$2`) back to its queue now; notifies `$3`.
pub(crate) const REQUEUE: &str = "
WITH back AS (
    UPDATE celery_rs_tasks SET leased_until = NULL
    WHERE id = $1 AND deliveries = $2 AND leased_until IS NOT NULL RETURNING queue)
SELECT pg_notify($3, queue) FROM back";

/// Holds message `$1` (token `$2`) until `$3` with the payload `$4`; notifies `$5` (a consumer
/// waiting for an eta recomputes it).
pub(crate) const DEFER: &str = "
WITH back AS (
    UPDATE celery_rs_tasks SET leased_until = NULL, run_at = $3, payload = $4
    WHERE id = $1 AND deliveries = $2 AND leased_until IS NOT NULL RETURNING queue)
SELECT pg_notify($5, queue) FROM back";

/// Moves message `$1` (token `$2`) to the dead-letter queue `$3` with reason `$4` and payload
/// `$5`; notifies `$6`. The delivery count goes on, so the token of any earlier lease stays dead.
pub(crate) const DEAD_LETTER: &str = "
WITH dead AS (
    UPDATE celery_rs_tasks
    SET queue = $3, reason = $4, payload = $5, leased_until = NULL, run_at = now(), priority = 0, fair_key = NULL
    WHERE id = $1 AND deliveries = $2 AND leased_until IS NOT NULL RETURNING queue)
SELECT pg_notify($6, queue) FROM dead";

/// Deletes every message of queue `$1` that is not leased (ready or waiting for its eta).
pub(crate) const PURGE: &str = "
WITH gone AS (DELETE FROM celery_rs_tasks WHERE queue = $1 AND leased_until IS NULL RETURNING 1)
SELECT count(*) FROM gone";

/// Ready messages of queue `$1`.
pub(crate) const QUEUE_LEN: &str =
    "SELECT count(*) FROM celery_rs_tasks WHERE queue = $1 AND leased_until IS NULL AND run_at <= now()";

/// Queue `$1`'s health, its dead-letter queue being `$2`: ready rows, ready dead letters, leased
/// rows, and the seconds since the oldest ready row became due (null when none is).
pub(crate) const QUEUE_STATS: &str = "
SELECT
    count(*) FILTER (WHERE queue = $1 AND leased_until IS NULL AND run_at <= now()),
    count(*) FILTER (WHERE queue = $2 AND leased_until IS NULL AND run_at <= now()),
    count(*) FILTER (WHERE queue = $1 AND leased_until IS NOT NULL),
    extract(epoch FROM now() - min(run_at) FILTER (WHERE queue = $1 AND leased_until IS NULL AND run_at <= now()))::float8
FROM celery_rs_tasks WHERE queue = $1 OR queue = $2";

/// The first `$2` ready messages of queue `$1`, in the order they are taken: `size, payload`,
/// the payload only when at most `$3` bytes, and only while the payloads sent add up to at most
/// `$4` bytes (the list ends there).
pub(crate) const PEEK: &str = "
SELECT size, CASE WHEN size <= $3::bigint THEN payload END FROM (
    SELECT octet_length(payload)::bigint AS size, payload, priority, run_at, id,
        sum(CASE WHEN octet_length(payload) <= $3::bigint THEN octet_length(payload) ELSE 0 END)
            OVER (ORDER BY priority, run_at, id ROWS UNBOUNDED PRECEDING) AS sent
    FROM celery_rs_tasks WHERE queue = $1 AND leased_until IS NULL AND run_at <= now()
    ORDER BY priority, run_at, id LIMIT $2) s
WHERE sent <= $4::bigint
ORDER BY priority, run_at, id";

/// Declares exchange `$1` of kind `$2` (a declared kind is kept).
pub(crate) const DECLARE_EXCHANGE: &str =
    "INSERT INTO celery_rs_exchanges (name, kind) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";

/// Binds queue `$3` to exchange `$1` with key `$2`.
pub(crate) const BIND: &str =
    "INSERT INTO celery_rs_bindings (exchange, routing_key, queue) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

/// The bindings of exchange `$1` with its kind (NULL when undeclared).
pub(crate) const BINDINGS: &str = "
SELECT b.routing_key, b.queue, e.kind FROM celery_rs_bindings b
LEFT JOIN celery_rs_exchanges e ON e.name = b.exchange WHERE b.exchange = $1";

/// A broadcast: stores nonce `$1`, exchange `$2`, routing key `$3` and body `$4`; notifies `$5`
/// with `<id>:<nonce>`.
pub(crate) const BROADCAST: &str = "
WITH ins AS (
    INSERT INTO celery_rs_broadcasts (nonce, exchange, routing_key, body) VALUES ($1, $2, $3, $4) RETURNING id)
SELECT pg_notify($5, id::text || ':' || $1::text) FROM ins";

/// The newest broadcast's id (0: none): a subscription delivers only newer ones.
pub(crate) const BROADCAST_NEWEST: &str = "SELECT coalesce(max(id), 0) FROM celery_rs_broadcasts";

/// The broadcasts announced as `$1` (ids) with `$2` (nonces) that exist with exactly that nonce,
/// for exchange `$3`, written less than `$4` seconds ago: `id, routing_key, body`, in the order
/// announced.
pub(crate) const BROADCAST_READ: &str = "
SELECT b.id, b.routing_key, b.body
FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS a(id, nonce, n)
JOIN celery_rs_broadcasts b ON b.id = a.id AND b.nonce = a.nonce
WHERE b.exchange = $3 AND b.created_at > now() - make_interval(secs => $4)
ORDER BY a.n";

/// Broadcasts one [`BROADCAST_PRUNE`] deletes at most.
pub(crate) const BROADCAST_PRUNE_BATCH: i64 = 10_000;

/// Deletes broadcasts older than `$1` seconds, at most `$2` ([`BROADCAST_PRUNE_BATCH`]); returns
/// how many.
pub(crate) const BROADCAST_PRUNE: &str = "
WITH gone AS (
    DELETE FROM celery_rs_broadcasts WHERE id IN (
        SELECT id FROM celery_rs_broadcasts WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)
    RETURNING 1)
SELECT count(*) FROM gone";

/// Takes or renews lease `$1` for holder `$2` for `$3` seconds; a row when held.
pub(crate) const LEASE: &str = "
INSERT INTO celery_rs_leases AS l (name, holder, expires_at) VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
WHERE l.holder = excluded.holder OR l.expires_at < now()
RETURNING 1";

/// Gives up lease `$1` if `$2` holds it.
pub(crate) const RELEASE: &str = "DELETE FROM celery_rs_leases WHERE name = $1 AND holder = $2";

/// Document `$1`.
pub(crate) const LOAD_DOC: &str = "SELECT doc FROM celery_rs_documents WHERE key = $1";

/// Stores document `$2` under `$1`.
pub(crate) const STORE_DOC: &str = "
INSERT INTO celery_rs_documents (key, doc) VALUES ($1, $2)
ON CONFLICT (key) DO UPDATE SET doc = excluded.doc, updated_at = now()";

/// Reserves the next start of rate bucket `$1` spaced `$2` seconds after the one reserved before
/// it (or now, when that is past); returns the seconds to wait until it (negative: none). The
/// bucket's row lock orders concurrent reservations. A new bucket first deletes the buckets idle
/// for a minute (their next start is past: they hold nothing), then is refused when `$3` are left.
pub(crate) const RATE_RESERVE: &str = "SELECT celery_rs_rate_reserve($1, $2, $3)";

/// Takes a slot of key `$1` (limit `$2`) for holder `$3` for `$4` seconds, or parks the message
/// (queue `$5`, priority `$6`, payload `$7`): true when taken, false when parked, NULL when the
/// key is full and `$7` is NULL (nothing parked: ask again with the payload). A key with no slot
/// held and nothing parked is refused when `$8` keys are tracked (with slots held or messages
/// parked). Migration 5 makes the seven-argument form (workers of earlier versions) this one with
/// a bound of 100,000.
pub(crate) const KEY_ACQUIRE: &str = "SELECT celery_rs_key_acquire($1, $2, $3, $4, $5, $6, $7, $8)";

/// Renews holder `$2`'s slot of key `$1` for `$3` seconds (taking it again if it was swept):
/// true when it was still there.
pub(crate) const KEY_RENEW: &str = "
INSERT INTO celery_rs_key_slots AS s (key, holder, expires_at) VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (key, holder) DO UPDATE SET expires_at = EXCLUDED.expires_at
RETURNING s.xmax <> 0";

/// Takes a slot of key `$1[i]` (limit `$2[i]`) for holder `$3[i]` for `$4[i]` seconds where one
/// is free, parking nothing: 1 where taken, 0 where not (the key is full, or it is new and `$5`
/// keys are tracked: the single [`KEY_ACQUIRE`] then parks or refuses it). The keys are locked in
/// one order (their lock's hash), so concurrent batches never wait on each other in a cycle.
/// Committed without waiting for the WAL flush (soft state, see [`super::limits`]).
pub(crate) const KEY_ACQUIRE_MANY: &str = "SELECT celery_rs_key_acquire_many($1, $2, $3, $4, $5)";

/// Frees holder `$2[i]`'s slot of key `$1[i]` for each i and moves the oldest parked message of
/// each key back to its queue (notifying `$3`): how many moved. Keys locked in one order, as
/// [`KEY_ACQUIRE_MANY`]; committed without waiting for the WAL flush.
pub(crate) const KEY_RELEASE_MANY: &str = "SELECT celery_rs_key_release_many($1, $2, $3)";

/// Frees the expired slots of up to `$2` keys and moves a parked message back for each (one for a
/// key with parked messages and no slot at all), notifying `$1`: how many moved.
pub(crate) const KEY_SWEEP: &str = "SELECT celery_rs_key_sweep($1, $2)";
