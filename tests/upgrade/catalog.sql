-- What a database's catalog says about pgflow, as (object, property, value) rows: one row per
-- property that an install or an upgrade decides. Two databases have the same pgflow when
-- this query returns the same rows in both; the upgrade tier compares an upgraded database
-- with a fresh install this way and prints every row that differs.
--
-- Covered: the extension (version, config-dump registrations), the schema and its privileges,
-- every function (signature with defaults, result, kind, language, volatility, strictness,
-- security, parallel safety, cost, SET clauses, body or C symbol, owner, privileges, comment),
-- every table, sequence, view and index (kind, persistence, options, columns with types,
-- defaults, nullability and identity, constraints, indexes, triggers, policies, sequence
-- parameters, owner, privileges, comments), types (composite attributes, enum labels, domain
-- rules), extension membership of each object, the pgflow roles with their attributes and
-- memberships, and default privileges in the schema. Privileges are listed in a sorted order:
-- the order GRANTs were run in means nothing.
--
-- Left out on purpose: objects that pgflow creates at run time as data (the per-queue message
-- sequences, pgflow.queue_<id>_msg_seq, which are not extension members) and what varies
-- between any two databases (OIDs, sequence positions, statistics, and the pg_attver column
-- option some server builds stamp on every column they create).
--
-- Run with search_path = pg_catalog so that every name below is printed schema-qualified.

WITH ext AS (
    SELECT e.oid, e.extversion, e.extconfig, e.extcondition, e.extnamespace
      FROM pg_catalog.pg_extension e WHERE e.extname = 'pgflow'
),
members AS (
    SELECT d.classid, d.objid FROM pg_catalog.pg_depend d, ext
     WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.refobjid = ext.oid
       AND d.deptype = 'e'
),
sorted_acl(acl, txt) AS (
    SELECT a.acl, (SELECT pg_catalog.string_agg(x::text, ' ' ORDER BY x::text)
                     FROM pg_catalog.unnest(a.acl) x)
      FROM (SELECT DISTINCT relacl AS acl FROM pg_catalog.pg_class
            UNION SELECT DISTINCT proacl FROM pg_catalog.pg_proc
            UNION SELECT DISTINCT typacl FROM pg_catalog.pg_type
            UNION SELECT DISTINCT nspacl FROM pg_catalog.pg_namespace
            UNION SELECT DISTINCT defaclacl FROM pg_catalog.pg_default_acl) a
     WHERE a.acl IS NOT NULL
),
rels AS (
    SELECT c.* FROM pg_catalog.pg_class c
     WHERE c.relnamespace = 'pgflow'::regnamespace
       AND NOT (c.relkind = 'S' AND c.relname ~ '^queue_[0-9]+_msg_seq$'
                AND NOT EXISTS (SELECT 1 FROM members m
                                 WHERE m.classid = 'pg_catalog.pg_class'::regclass
                                   AND m.objid = c.oid))
),
procs AS (
    SELECT p.* FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'pgflow'::regnamespace
),
types AS (
    SELECT t.* FROM pg_catalog.pg_type t
     WHERE t.typnamespace = 'pgflow'::regnamespace
       -- row and array types come and go with their table or base type
       AND t.typtype <> 'b' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                                             WHERE c.oid = t.typrelid AND c.relkind <> 'c')
),
rows(object, property, value) AS (
    -- the extension
    SELECT 'extension pgflow', 'version', extversion FROM ext
    UNION ALL
    SELECT 'extension pgflow', 'config dump ' || cfg::regclass::text,
           coalesce(ext.extcondition[i], '')
      FROM ext, pg_catalog.generate_subscripts(ext.extconfig, 1) i,
           LATERAL (SELECT ext.extconfig[i] AS cfg) c
    UNION ALL
    SELECT 'extension pgflow', 'member',
           pg_catalog.pg_describe_object(m.classid, m.objid, 0)
      FROM members m
    -- the schema
    UNION ALL
    SELECT 'schema pgflow', 'owner', n.nspowner::regrole::text
      FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgflow'
    UNION ALL
    SELECT 'schema pgflow', 'privileges', s.txt
      FROM pg_catalog.pg_namespace n JOIN sorted_acl s ON s.acl = n.nspacl
     WHERE n.nspname = 'pgflow'
    UNION ALL
    SELECT 'schema pgflow', 'comment', pg_catalog.obj_description(n.oid, 'pg_namespace')
      FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgflow'
    -- functions
    UNION ALL
    SELECT 'function ' || p.oid::regprocedure::text, x.property, x.value
      FROM procs p
      JOIN pg_catalog.pg_language l ON l.oid = p.prolang
      LEFT JOIN sorted_acl s ON s.acl = p.proacl
      CROSS JOIN LATERAL (VALUES
          ('arguments', pg_catalog.pg_get_function_arguments(p.oid)),
          ('result', pg_catalog.pg_get_function_result(p.oid)),
          ('kind', p.prokind::text),
          ('language', l.lanname::text),
          ('volatility', p.provolatile::text),
          ('strict', p.proisstrict::text),
          ('security definer', p.prosecdef::text),
          ('leakproof', p.proleakproof::text),
          ('parallel', p.proparallel::text),
          ('cost', p.procost::text),
          ('rows', p.prorows::text),
          ('set', pg_catalog.array_to_string(p.proconfig, ', ')),
          ('body', p.prosrc),
          ('library', p.probin),
          ('owner', p.proowner::regrole::text),
          ('privileges', s.txt),
          ('comment', pg_catalog.obj_description(p.oid, 'pg_proc'))
      ) x(property, value)
    -- tables, sequences, views, indexes, composite types' relations
    UNION ALL
    SELECT 'relation ' || c.oid::regclass::text, x.property, x.value
      FROM rels c
      LEFT JOIN sorted_acl s ON s.acl = c.relacl
      CROSS JOIN LATERAL (VALUES
          ('kind', c.relkind::text),
          ('persistence', c.relpersistence::text),
          ('options', pg_catalog.array_to_string(c.reloptions, ', ')),
          ('row security', c.relrowsecurity::text || '/' || c.relforcerowsecurity::text),
          ('owner', c.relowner::regrole::text),
          ('privileges', s.txt),
          ('comment', pg_catalog.obj_description(c.oid, 'pg_class')),
          ('index', CASE WHEN c.relkind = 'i' THEN pg_catalog.pg_get_indexdef(c.oid) END),
          ('view', CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END)
      ) x(property, value)
     WHERE c.relkind <> 'c'
    UNION ALL
    SELECT 'relation ' || c.oid::regclass::text,
           'column ' || pg_catalog.lpad(a.attnum::text, 3, '0') || ' ' || a.attname,
           pg_catalog.concat_ws(' ',
               pg_catalog.format_type(a.atttypid, a.atttypmod),
               CASE WHEN a.attnotnull THEN 'not null' END,
               CASE WHEN a.attidentity <> '' THEN 'identity ' || a.attidentity::text END,
               CASE WHEN a.attgenerated <> '' THEN 'generated ' || a.attgenerated::text END,
               'default ' || pg_catalog.pg_get_expr(ad.adbin, ad.adrelid),
               CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                    THEN 'collate ' || a.attcollation::regcollation::text END,
               'options ' || (SELECT pg_catalog.string_agg(o, ', ' ORDER BY o)
                                FROM pg_catalog.unnest(a.attoptions) o WHERE o NOT LIKE 'pg\_attver=%'),
               'privileges ' || (SELECT pg_catalog.string_agg(x::text, ' ' ORDER BY x::text)
                                   FROM pg_catalog.unnest(a.attacl) x),
               'comment ' || pg_catalog.col_description(c.oid, a.attnum))
      FROM rels c
      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
      LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
     WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
    UNION ALL
    SELECT 'relation ' || co.conrelid::regclass::text, 'constraint ' || co.conname,
           pg_catalog.pg_get_constraintdef(co.oid)
             || coalesce(' comment ' || pg_catalog.obj_description(co.oid, 'pg_constraint'), '')
      FROM pg_catalog.pg_constraint co JOIN rels c ON c.oid = co.conrelid
    UNION ALL
    SELECT 'relation ' || tg.tgrelid::regclass::text, 'trigger ' || tg.tgname,
           pg_catalog.pg_get_triggerdef(tg.oid) || ' enabled ' || tg.tgenabled::text
             || coalesce(' comment ' || pg_catalog.obj_description(tg.oid, 'pg_trigger'), '')
      FROM pg_catalog.pg_trigger tg JOIN rels c ON c.oid = tg.tgrelid
     WHERE NOT tg.tgisinternal
    UNION ALL
    SELECT 'relation ' || po.polrelid::regclass::text, 'policy ' || po.polname,
           pg_catalog.concat_ws(' ', po.polcmd::text, po.polpermissive::text, po.polroles::text,
                                pg_catalog.pg_get_expr(po.polqual, po.polrelid),
                                pg_catalog.pg_get_expr(po.polwithcheck, po.polrelid))
      FROM pg_catalog.pg_policy po JOIN rels c ON c.oid = po.polrelid
    UNION ALL
    SELECT 'relation ' || sq.seqrelid::regclass::text, 'sequence',
           pg_catalog.concat_ws(' ', sq.seqtypid::regtype::text, sq.seqstart, sq.seqincrement,
                                sq.seqmax, sq.seqmin, sq.seqcache, sq.seqcycle,
                                'owned by ' || (SELECT d.refobjid::regclass::text || '.' || at.attname
                                                  FROM pg_catalog.pg_depend d
                                                  JOIN pg_catalog.pg_attribute at
                                                    ON at.attrelid = d.refobjid AND at.attnum = d.refobjsubid
                                                 WHERE d.classid = 'pg_catalog.pg_class'::regclass
                                                   AND d.objid = sq.seqrelid AND d.deptype IN ('a', 'i')
                                                   AND d.refclassid = 'pg_catalog.pg_class'::regclass))
      FROM pg_catalog.pg_sequence sq JOIN rels c ON c.oid = sq.seqrelid
    -- types
    UNION ALL
    SELECT 'type ' || t.oid::regtype::text, x.property, x.value
      FROM types t
      LEFT JOIN sorted_acl s ON s.acl = t.typacl
      CROSS JOIN LATERAL (VALUES
          ('kind', t.typtype::text),
          ('owner', t.typowner::regrole::text),
          ('privileges', s.txt),
          ('comment', pg_catalog.obj_description(t.oid, 'pg_type')),
          ('domain of', CASE WHEN t.typtype = 'd' THEN
              pg_catalog.format_type(t.typbasetype, t.typtypmod) || ' not null ' || t.typnotnull::text
              || ' default ' || coalesce(t.typdefault, '') END),
          ('enum labels', (SELECT pg_catalog.string_agg(e.enumlabel, ', ' ORDER BY e.enumsortorder)
                             FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid)),
          ('attributes', (SELECT pg_catalog.string_agg(
                                   a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod),
                                   ', ' ORDER BY a.attnum)
                            FROM pg_catalog.pg_attribute a
                           WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped))
      ) x(property, value)
    UNION ALL
    SELECT 'type ' || co.contypid::regtype::text, 'constraint ' || co.conname,
           pg_catalog.pg_get_constraintdef(co.oid)
      FROM pg_catalog.pg_constraint co JOIN types t ON t.oid = co.contypid
    -- default privileges in the schema
    UNION ALL
    SELECT 'default privileges ' || da.defaclrole::regrole::text, da.defaclobjtype::text, s.txt
      FROM pg_catalog.pg_default_acl da JOIN sorted_acl s ON s.acl = da.defaclacl
     WHERE da.defaclnamespace = 'pgflow'::regnamespace
    -- the roles pgflow creates, and who is a member of which
    UNION ALL
    SELECT 'role ' || r.rolname, 'attributes',
           pg_catalog.concat_ws(' ', 'login ' || r.rolcanlogin, 'super ' || r.rolsuper,
                                'inherit ' || r.rolinherit, 'createrole ' || r.rolcreaterole,
                                'createdb ' || r.rolcreatedb, 'bypassrls ' || r.rolbypassrls)
      FROM pg_catalog.pg_roles r WHERE r.rolname LIKE 'pgflow\_%'
    UNION ALL
    SELECT 'role ' || r.rolname, 'member of ' || g.rolname, am.admin_option::text
      FROM pg_catalog.pg_auth_members am
      JOIN pg_catalog.pg_roles r ON r.oid = am.member
      JOIN pg_catalog.pg_roles g ON g.oid = am.roleid
     WHERE r.rolname LIKE 'pgflow\_%' OR g.rolname LIKE 'pgflow\_%'
)
SELECT object, property, value FROM rows
 WHERE value IS NOT NULL AND value <> ''
 ORDER BY 1, 2, 3;
