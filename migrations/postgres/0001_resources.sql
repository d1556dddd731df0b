-- Meridian control plane, Postgres schema (production store).
-- Keep this file in step with ../sqlite/0001_resources.sql: one behaviour, two dialects.
--
-- Naming: `*_key` columns hold the lower-cased form used for ARM's case-insensitive comparisons;
-- `id` keeps the casing the client used first, which is what GET returns.
-- Keys use COLLATE "C" so ordering (the pagination order) is bytewise, as in SQLite, and does not
-- depend on the cluster's locale.

-- Every ARM resource of every declared type, one row each. The body is text, not jsonb, so it
-- comes back verbatim (jsonb would reorder keys); no query looks inside it.
CREATE TABLE resources (
    id_key             TEXT COLLATE "C" PRIMARY KEY,
    id                 TEXT NOT NULL,
    -- The parent resource; deleting a parent cascades to its children through this key, and a
    -- child cannot be inserted without its parent (the race-free ParentResourceNotFound check).
    parent_key         TEXT COLLATE "C" REFERENCES resources (id_key) ON DELETE CASCADE,
    subscription_key   TEXT COLLATE "C" NOT NULL,
    -- Empty for subscription-scoped resources (role assignments at subscription scope).
    resource_group_key TEXT COLLATE "C" NOT NULL,
    type_key           TEXT COLLATE "C" NOT NULL,
    body               TEXT NOT NULL,
    -- Changes on every client write; compared by If-Match and by the conditional UPDATE.
    etag               TEXT NOT NULL,
    provisioning_state TEXT NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL
);

CREATE INDEX resources_by_scope ON resources (type_key, subscription_key, resource_group_key, id_key);
CREATE INDEX resources_by_parent ON resources (parent_key, type_key, id_key);

-- Asynchronous operations the SDK pollers follow (Azure-AsyncOperation and Location monitors).
CREATE TABLE operations (
    id                 TEXT PRIMARY KEY,
    subscription_key   TEXT COLLATE "C" NOT NULL,
    resource_group_key TEXT COLLATE "C" NOT NULL,
    resource_id        TEXT NOT NULL,
    kind               TEXT NOT NULL CONSTRAINT operations_kind CHECK (kind IN ('put', 'delete')),
    status             TEXT NOT NULL CONSTRAINT operations_status
                       CHECK (status IN ('Accepted', 'Provisioning', 'Succeeded', 'Failed', 'Canceled')),
    start_time         TIMESTAMPTZ NOT NULL,
    end_time           TIMESTAMPTZ,
    error              TEXT
);
