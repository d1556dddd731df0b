-- Meridian control plane, SQLite schema (the embedded default store).
-- Keep this file in step with ../postgres/0001_resources.sql: one behaviour, two dialects.
--
-- Naming: `*_key` columns hold the lower-cased form used for ARM's case-insensitive comparisons;
-- `id` keeps the casing the client used first, which is what GET returns.

-- Every ARM resource of every declared type, one row each. The body is the resource's JSON as
-- returned to clients (minus provisioningState), stored as text so it comes back verbatim.
CREATE TABLE resources (
    -- Lower-cased full ARM id: the identity of the row.
    id_key             TEXT PRIMARY KEY NOT NULL,
    id                 TEXT NOT NULL,
    -- The parent resource; deleting a parent cascades to its children through this key.
    -- (SQLite foreign keys are enforced: sqlx turns PRAGMA foreign_keys on for every connection.)
    parent_key         TEXT REFERENCES resources (id_key) ON DELETE CASCADE,
    subscription_key   TEXT NOT NULL,
    -- Empty for subscription-scoped resources (role assignments at subscription scope).
    resource_group_key TEXT NOT NULL,
    -- Lower-cased `Namespace/type/child` name, e.g. `microsoft.eventgrid/namespaces/topicspaces`.
    type_key           TEXT NOT NULL,
    body               TEXT NOT NULL,
    -- Changes on every client write; compared by If-Match and by the conditional UPDATE.
    etag               TEXT NOT NULL,
    -- Accepted / Provisioning / Succeeded / Failed: written by operations, not by clients.
    provisioning_state TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);

-- List by resource group / subscription, in id order (the pagination order).
CREATE INDEX resources_by_scope ON resources (type_key, subscription_key, resource_group_key, id_key);
-- List by parent, and the cascade's lookup of children.
CREATE INDEX resources_by_parent ON resources (parent_key, type_key, id_key);

-- Asynchronous operations the SDK pollers follow (Azure-AsyncOperation and Location monitors).
-- Kept after the resource is gone so a delete's monitor can still answer "done".
CREATE TABLE operations (
    id                 TEXT PRIMARY KEY NOT NULL,
    subscription_key   TEXT NOT NULL,
    resource_group_key TEXT NOT NULL,
    resource_id        TEXT NOT NULL,
    -- `put` or `delete`.
    kind               TEXT NOT NULL CHECK (kind IN ('put', 'delete')),
    status             TEXT NOT NULL CHECK (status IN ('Accepted', 'Provisioning', 'Succeeded', 'Failed', 'Canceled')),
    start_time         TEXT NOT NULL,
    end_time           TEXT,
    -- ARM error object (JSON text) when status is Failed.
    error              TEXT
);
