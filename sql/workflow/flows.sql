-- Workflow layer: defining flows (create_flow, add_step, shapes, drop_flow).
--
-- Conventions are those of the queue layer (sql/queue/api.sql): pinned search_path,
-- SECURITY DEFINER on public functions, arguments checked before anything is written, specific
-- SQLSTATEs (22004 null, 22023 invalid value, 42622 slug too long, 42704 unknown flow or step,
-- 42710 exists with another definition, 55000 wrong state), messages naming the argument.
-- Defining is idempotent: defining again what exists, identically, changes nothing.

-- Check one task option: NULL allowed only when nullable (a step inheriting the flow's value).
CREATE FUNCTION pgflow._check_option(arg text, value integer, lo integer, hi integer, nullable boolean)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF value IS NULL THEN
        IF NOT nullable THEN
            RAISE EXCEPTION '% must not be null', arg USING ERRCODE = '22004';
        END IF;
    ELSIF value < lo OR value > hi THEN
        RAISE EXCEPTION '% must be between % and %, not %', arg, lo, hi, value USING ERRCODE = '22023',
            HINT = CASE arg WHEN 'max_attempts' THEN 'max_attempts counts the first attempt: 1 means no retry.'
                            WHEN 'timeout' THEN 'timeout is in seconds, 1 to 86400 (one day).'
                            ELSE arg || ' is in seconds.' END;
    END IF;
END
$$;

-- The flow row, or 42704 (a malformed slug is reported as such).
CREATE FUNCTION pgflow._flow(flow_slug text) RETURNS pgflow.flows
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp SET enable_seqscan = off SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    f pgflow.flows;
BEGIN
    SELECT * INTO f FROM pgflow.flows WHERE flow_slug = _flow.flow_slug;
    IF NOT FOUND THEN
        PERFORM pgflow._check_name(_flow.flow_slug, 'flow_slug');
        RAISE EXCEPTION 'flow "%" does not exist', _flow.flow_slug
            USING ERRCODE = '42704', HINT = 'Create it with pgflow.create_flow(flow_slug) and pgflow.add_step.';
    END IF;
    RETURN f;
END
$$;

CREATE FUNCTION pgflow.create_flow(flow_slug text, max_attempts integer DEFAULT 3, base_delay integer DEFAULT 1,
                                   timeout integer DEFAULT 60)
RETURNS pgflow.flows
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f pgflow.flows;
    created boolean;
BEGIN
    PERFORM pgflow._check_name(create_flow.flow_slug, 'flow_slug');
    PERFORM pgflow._check_option('max_attempts', create_flow.max_attempts, 1, 100, false);
    PERFORM pgflow._check_option('base_delay', create_flow.base_delay, 0, 86400, false);
    PERFORM pgflow._check_option('timeout', create_flow.timeout, 1, 86400, false);
    -- Concurrent definitions of one slug are serialised, so the second sees the first's flow.
    PERFORM pgflow._lock_flow(create_flow.flow_slug, true);
    SELECT * INTO f FROM pgflow.flows WHERE flow_slug = create_flow.flow_slug FOR UPDATE;
    IF FOUND THEN
        IF (f.opt_max_attempts, f.opt_base_delay, f.opt_timeout)
           IS DISTINCT FROM (create_flow.max_attempts, create_flow.base_delay, create_flow.timeout) THEN
            RAISE EXCEPTION 'flow "%" already exists with other options', create_flow.flow_slug
                USING ERRCODE = '42710',
                      DETAIL = format('It has max_attempts %s, base_delay %s, timeout %s.',
                                      f.opt_max_attempts, f.opt_base_delay, f.opt_timeout),
                      HINT = 'A flow''s definition does not change: drop it with pgflow.drop_flow, or create the new definition under another slug.';
        END IF;
        RETURN f;
    END IF;
    -- The flow's tasks travel through the queue of the same name. Attempts are counted by the
    -- workflow layer, so the queue itself never dead-letters them (max_retries at its maximum,
    -- above any max_attempts).
    -- An existing queue of that name is refused whatever its options (create_queue would
    -- accept one with the same options, or raise its own error for other options).
    IF EXISTS (SELECT 1 FROM pgflow.queues WHERE queue_name = create_flow.flow_slug) THEN
        created := false;
    ELSE
        created := pgflow.create_queue(create_flow.flow_slug, max_retries => 100, retry_delay_ms => 0,
                                       max_retry_delay_ms => 0);
    END IF;
    IF NOT created THEN
        RAISE EXCEPTION 'a queue named "%" already exists', create_flow.flow_slug
            USING ERRCODE = '42710',
                  HINT = 'A flow delivers its tasks through a queue of its own name: choose another flow_slug, or drop that queue.';
    END IF;
    -- From now on only the workflow functions move the queue's messages (pgflow._check_unmanaged).
    UPDATE pgflow.queues SET managed_by = 'flow' WHERE queue_name = create_flow.flow_slug;
    INSERT INTO pgflow.flows (flow_slug, opt_max_attempts, opt_base_delay, opt_timeout)
    VALUES (create_flow.flow_slug, create_flow.max_attempts, create_flow.base_delay, create_flow.timeout)
    RETURNING * INTO f;
    RETURN f;
END
$$;
COMMENT ON FUNCTION pgflow.create_flow(text, integer, integer, integer) IS
'Create a flow and the queue of the same name that delivers its tasks; returns the flow row. Slug: ASCII letters, digits, underscore, 1-48 bytes. Task options, which steps may override: max_attempts (1-100, the first attempt included), base_delay (0-86400 s; retry n waits base_delay * 2^(n-1) s, capped at 86400 s), timeout (1-86400 s before a started task may be claimed again). Creating an existing flow with the same options is a no-op; with other options it fails with 42710.';

-- A step's condition and what an unmet condition or running out of attempts does: the one
-- check, for add_step and shapes. names: how the caller calls the four values (its arguments,
-- or a shape's keys).
CREATE FUNCTION pgflow._check_condition(if_input jsonb, if_not_input jsonb, when_unmet text, when_exhausted text,
                                        names text[]) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF jsonb_typeof(if_input) IS DISTINCT FROM 'object' AND if_input IS NOT NULL THEN
        RAISE EXCEPTION '% must be a JSON object, not a JSON %', names[1], jsonb_typeof(if_input)
            USING ERRCODE = '22023',
            HINT = 'A step''s input is an object, {"run": <run input>, "<dep>": <its output>, ...}; the condition is a part it must contain.';
    END IF;
    IF jsonb_typeof(if_not_input) IS DISTINCT FROM 'object' AND if_not_input IS NOT NULL THEN
        RAISE EXCEPTION '% must be a JSON object, not a JSON %', names[2], jsonb_typeof(if_not_input)
            USING ERRCODE = '22023',
            HINT = 'A step''s input is an object, {"run": <run input>, "<dep>": <its output>, ...}; the condition is a part it must not contain.';
    END IF;
    IF when_unmet IS NULL THEN
        RAISE EXCEPTION '% must not be null', names[3] USING ERRCODE = '22004';
    ELSIF when_unmet NOT IN ('skip', 'skip_cascade', 'fail') THEN
        RAISE EXCEPTION '% must be ''skip'', ''skip_cascade'' or ''fail'', not "%"', names[3], left(when_unmet, 64)
            USING ERRCODE = '22023';
    END IF;
    IF when_exhausted IS NULL THEN
        RAISE EXCEPTION '% must not be null', names[4] USING ERRCODE = '22004';
    ELSIF when_exhausted NOT IN ('fail', 'skip', 'skip_cascade') THEN
        RAISE EXCEPTION '% must be ''fail'', ''skip'' or ''skip_cascade'', not "%"', names[4], left(when_exhausted, 64)
            USING ERRCODE = '22023';
    END IF;
END
$$;

CREATE FUNCTION pgflow.add_step(flow_slug text, step_slug text, deps_slugs text[] DEFAULT '{}',
                                max_attempts integer DEFAULT NULL, base_delay integer DEFAULT NULL,
                                timeout integer DEFAULT NULL, start_delay integer DEFAULT NULL,
                                step_type text DEFAULT 'single', if_input jsonb DEFAULT NULL,
                                if_not_input jsonb DEFAULT NULL, when_unmet text DEFAULT 'skip',
                                when_exhausted text DEFAULT 'fail')
RETURNS pgflow.steps
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f pgflow.flows;
    s pgflow.steps;
    old_deps text[];
    i integer;
    d text;
BEGIN
    PERFORM pgflow._check_name(add_step.flow_slug, 'flow_slug');
    PERFORM pgflow._check_name(add_step.step_slug, 'step_slug');
    IF add_step.step_slug = 'run' THEN
        RAISE EXCEPTION 'step_slug "run" is reserved' USING ERRCODE = '22023',
            HINT = 'A task''s input holds the run input under the key "run"; choose another step_slug.';
    END IF;
    IF add_step.deps_slugs IS NULL THEN
        RAISE EXCEPTION 'deps_slugs must not be null' USING ERRCODE = '22004',
            HINT = 'Pass ''{}'' for a root step.';
    ELSIF array_ndims(add_step.deps_slugs) > 1 THEN
        RAISE EXCEPTION 'deps_slugs must be a one-dimensional array' USING ERRCODE = '22023';
    END IF;
    i := 0;
    FOREACH d IN ARRAY add_step.deps_slugs LOOP
        i := i + 1;
        IF d IS NULL THEN
            RAISE EXCEPTION 'deps_slugs[%] is null', i USING ERRCODE = '22004';
        END IF;
        PERFORM pgflow._check_name(d, format('deps_slugs[%s]', i));
        IF d = add_step.step_slug THEN
            RAISE EXCEPTION 'deps_slugs[%] names step "%" itself: a step cannot depend on itself', i, d
                USING ERRCODE = '22023';
        END IF;
        IF array_position(add_step.deps_slugs, d) < i THEN
            RAISE EXCEPTION 'deps_slugs names "%" twice', d USING ERRCODE = '22023';
        END IF;
    END LOOP;
    PERFORM pgflow._check_option('max_attempts', add_step.max_attempts, 1, 100, true);
    PERFORM pgflow._check_option('base_delay', add_step.base_delay, 0, 86400, true);
    -- a signal step's timeout bounds a wait for a person or a system: up to a year
    PERFORM pgflow._check_option('timeout', add_step.timeout, 1,
                                 CASE WHEN add_step.step_type = 'signal' THEN 31536000 ELSE 86400 END, true);
    PERFORM pgflow._check_option('start_delay', add_step.start_delay, 0, 31536000, true);
    IF add_step.step_type IS NULL THEN
        RAISE EXCEPTION 'step_type must not be null' USING ERRCODE = '22004';
    ELSIF add_step.step_type NOT IN ('single', 'map', 'signal') THEN
        RAISE EXCEPTION 'step_type must be ''single'', ''map'' or ''signal'', not "%"', left(add_step.step_type, 64)
            USING ERRCODE = '22023';
    ELSIF add_step.step_type = 'signal' AND num_nonnulls(add_step.max_attempts, add_step.base_delay, add_step.start_delay) > 0 THEN
        RAISE EXCEPTION 'signal step "%" takes no max_attempts, base_delay or start_delay: it has no tasks', add_step.step_slug
            USING ERRCODE = '22023',
            HINT = 'A signal step waits for pgflow.signal; its timeout (optional) bounds the wait.';
    ELSIF add_step.step_type = 'map' AND cardinality(add_step.deps_slugs) > 1 THEN
        RAISE EXCEPTION 'map step "%" has % dependencies; a map step has at most one', add_step.step_slug,
            cardinality(add_step.deps_slugs) USING ERRCODE = '22023',
            HINT = 'A map step maps over the run input (no dependency) or over the array output of its one dependency.';
    END IF;
    PERFORM pgflow._check_condition(add_step.if_input, add_step.if_not_input, add_step.when_unmet,
                                    add_step.when_exhausted,
                                    ARRAY['if_input', 'if_not_input', 'when_unmet', 'when_exhausted']);

    -- Definitions of one flow are serialised on its row.
    SELECT * INTO f FROM pgflow.flows WHERE flow_slug = add_step.flow_slug FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'flow "%" does not exist', add_step.flow_slug
            USING ERRCODE = '42704', HINT = 'Create it first with pgflow.create_flow(flow_slug).';
    END IF;

    SELECT * INTO s FROM pgflow.steps WHERE flow_slug = add_step.flow_slug AND step_slug = add_step.step_slug;
    IF FOUND THEN
        old_deps := ARRAY(SELECT dd.dep_slug FROM pgflow.deps dd
                           WHERE dd.flow_slug = add_step.flow_slug AND dd.step_slug = add_step.step_slug
                           ORDER BY dd.dep_index);
        IF (s.step_type, s.opt_max_attempts, s.opt_base_delay, s.opt_timeout, s.opt_start_delay, old_deps,
            s.if_input, s.if_not_input, s.when_unmet, s.when_exhausted)
           IS DISTINCT FROM (add_step.step_type, add_step.max_attempts, add_step.base_delay, add_step.timeout,
                             add_step.start_delay, add_step.deps_slugs, add_step.if_input, add_step.if_not_input,
                             add_step.when_unmet, add_step.when_exhausted) THEN
            RAISE EXCEPTION 'step "%" of flow "%" already exists with another definition', add_step.step_slug,
                add_step.flow_slug USING ERRCODE = '42710',
                HINT = 'A flow''s definition does not change: drop it with pgflow.drop_flow, or use another step_slug.';
        END IF;
        RETURN s;
    END IF;

    FOREACH d IN ARRAY add_step.deps_slugs LOOP
        IF NOT EXISTS (SELECT 1 FROM pgflow.steps x WHERE x.flow_slug = add_step.flow_slug AND x.step_slug = d) THEN
            RAISE EXCEPTION 'dependency "%" of step "%" is not a step of flow "%"', d, add_step.step_slug,
                add_step.flow_slug USING ERRCODE = '42704',
                HINT = 'Add a step''s dependencies before the step itself.';
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pgflow.runs r WHERE r.flow_slug = add_step.flow_slug) THEN
        RAISE EXCEPTION 'flow "%" already has runs; its steps can no longer change', add_step.flow_slug
            USING ERRCODE = '55000',
                  HINT = 'Create the new definition under another flow_slug, or drop the flow with its runs.';
    END IF;

    INSERT INTO pgflow.steps (flow_slug, step_slug, step_type, step_index, deps_count, opt_max_attempts,
                              opt_base_delay, opt_timeout, opt_start_delay, if_input, if_not_input, when_unmet,
                              when_exhausted)
    VALUES (add_step.flow_slug, add_step.step_slug, add_step.step_type,
            (SELECT count(*) FROM pgflow.steps x WHERE x.flow_slug = add_step.flow_slug),
            cardinality(add_step.deps_slugs), add_step.max_attempts, add_step.base_delay, add_step.timeout,
            add_step.start_delay, add_step.if_input, add_step.if_not_input, add_step.when_unmet,
            add_step.when_exhausted)
    RETURNING * INTO s;
    INSERT INTO pgflow.deps (flow_slug, dep_slug, step_slug, dep_index)
    SELECT add_step.flow_slug, x.dep, add_step.step_slug, x.i - 1
      FROM unnest(add_step.deps_slugs) WITH ORDINALITY AS x(dep, i);
    RETURN s;
END
$$;
COMMENT ON FUNCTION pgflow.add_step(text, text, text[], integer, integer, integer, integer, text, jsonb, jsonb, text, text) IS
'Add a step to a flow; returns the step row. deps_slugs: steps of the flow, already added, that must complete (or be skipped) first (so a flow is a DAG by construction). Options left NULL inherit the flow''s; start_delay (0-31536000 s) delays the step''s tasks after it becomes ready. step_type ''map'': one task per element of an array, the run input (no dependency) or the output of its one dependency; its output is the array of its task outputs. step_type ''signal'': no task; once ready it waits for pgflow.signal, whose payload is its output; timeout (optional, not inherited) bounds the wait, after which when_exhausted applies. Condition: when the step becomes ready, its input ({"run": ..., "<dep>": <output>, ...}) must contain if_input and must not contain if_not_input (JSON objects, jsonb @>); when_unmet: skip (default; dependents run without its key), skip_cascade (it and every step after it are skipped) or fail (the run fails). when_exhausted: what running out of attempts (or fail_task with retry => false) does: fail (default: the run fails), skip or skip_cascade. Adding an identical step again is a no-op; a different one fails with 42710; a flow that has runs can take no new steps (55000).';

---------------------------------------------------------------------------------------------
-- Shapes: a whole flow as one JSON document
---------------------------------------------------------------------------------------------

CREATE FUNCTION pgflow.get_flow_shape(flow_slug text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    f pgflow.flows;
BEGIN
    f := pgflow._flow(get_flow_shape.flow_slug);
    RETURN jsonb_build_object(
        'max_attempts', f.opt_max_attempts,
        'base_delay', f.opt_base_delay,
        'timeout', f.opt_timeout,
        'steps', coalesce((
            SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                       'slug', s.step_slug,
                       'type', s.step_type,
                       'max_attempts', s.opt_max_attempts,
                       'base_delay', s.opt_base_delay,
                       'timeout', s.opt_timeout,
                       'start_delay', s.opt_start_delay,
                       'if', s.if_input,
                       'if_not', s.if_not_input,
                       'when_unmet', nullif(s.when_unmet, 'skip'),
                       'when_exhausted', nullif(s.when_exhausted, 'fail')))
                   || jsonb_build_object('deps', coalesce((
                       SELECT jsonb_agg(d.dep_slug ORDER BY d.dep_index) FROM pgflow.deps d
                        WHERE d.flow_slug = s.flow_slug AND d.step_slug = s.step_slug), '[]'::jsonb))
                   ORDER BY s.step_index)
              FROM pgflow.steps s WHERE s.flow_slug = f.flow_slug), '[]'::jsonb));
END
$$;
COMMENT ON FUNCTION pgflow.get_flow_shape(text) IS
'The whole definition of a flow as one JSON document: {"max_attempts","base_delay","timeout","steps":[{"slug","type","deps":[...], and "max_attempts","base_delay","timeout","start_delay" where the step overrides the flow, and "if","if_not","when_unmet","when_exhausted" where the step has a condition or does not take the defaults}, ...]}, steps in definition order. pgflow.create_flow_from_shape accepts it back unchanged.';

CREATE FUNCTION pgflow._shape_int(doc jsonb, key text, path text, nullable boolean) RETURNS integer
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v jsonb := doc -> key;
BEGIN
    IF v IS NULL OR v = 'null'::jsonb THEN
        IF nullable THEN
            RETURN NULL;
        END IF;
        RAISE EXCEPTION 'invalid flow shape: % must not be null', path || key USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(v) <> 'number' OR v::text::numeric <> trunc(v::text::numeric)
       OR v::text::numeric NOT BETWEEN -2147483648 AND 2147483647 THEN
        RAISE EXCEPTION 'invalid flow shape: % must be an integer, not %', path || key, left(v::text, 64)
            USING ERRCODE = '22023';
    END IF;
    RETURN v::text::numeric::integer;
END
$$;

-- Validate a shape and return it in canonical form (the form get_flow_shape returns), steps
-- sorted so that every step comes after its dependencies (input order kept where it allows).
CREATE FUNCTION pgflow._canonical_shape(shape jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
    st jsonb;
    i integer := 0;
    slugs text[] := '{}';
    steps jsonb[] := '{}';
    deps text[];
    d jsonb;
    t text;
    placed text[] := '{}';
    out_steps jsonb := '[]';
    progress boolean;
    n integer;
    where_ text;
BEGIN
    IF shape IS NULL THEN
        RAISE EXCEPTION 'shape must not be null' USING ERRCODE = '22004';
    ELSIF jsonb_typeof(shape) <> 'object' THEN
        RAISE EXCEPTION 'invalid flow shape: it must be a JSON object, not a JSON %', jsonb_typeof(shape)
            USING ERRCODE = '22023', HINT = 'See pgflow.get_flow_shape for the form.';
    END IF;
    FOR k IN SELECT jsonb_object_keys(shape) LOOP
        IF k NOT IN ('max_attempts', 'base_delay', 'timeout', 'steps') THEN
            RAISE EXCEPTION 'invalid flow shape: unknown key "%"', left(k, 64) USING ERRCODE = '22023',
                HINT = 'A shape has the keys max_attempts, base_delay, timeout and steps.';
        END IF;
    END LOOP;
    IF jsonb_typeof(shape -> 'steps') IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'invalid flow shape: steps must be an array' USING ERRCODE = '22023';
    END IF;
    FOR st IN SELECT value FROM jsonb_array_elements(shape -> 'steps') LOOP
        where_ := format('steps[%s].', i);
        IF jsonb_typeof(st) <> 'object' THEN
            RAISE EXCEPTION 'invalid flow shape: steps[%] must be an object', i USING ERRCODE = '22023';
        END IF;
        FOR k IN SELECT jsonb_object_keys(st) LOOP
            IF k NOT IN ('slug', 'type', 'deps', 'max_attempts', 'base_delay', 'timeout', 'start_delay',
                         'if', 'if_not', 'when_unmet', 'when_exhausted') THEN
                RAISE EXCEPTION 'invalid flow shape: unknown key "%" in steps[%]', left(k, 64), i
                    USING ERRCODE = '22023',
                    HINT = 'A step has the keys slug, type, deps, max_attempts, base_delay, timeout, start_delay, if, if_not, when_unmet and when_exhausted.';
            END IF;
        END LOOP;
        IF jsonb_typeof(st -> 'slug') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION 'invalid flow shape: steps[%].slug must be a string', i USING ERRCODE = '22023';
        END IF;
        PERFORM pgflow._check_name(st ->> 'slug', format('steps[%s].slug', i));
        IF st ->> 'slug' = 'run' THEN
            RAISE EXCEPTION 'invalid flow shape: step slug "run" is reserved' USING ERRCODE = '22023',
                HINT = 'A task''s input holds the run input under the key "run".';
        END IF;
        IF st ->> 'slug' = ANY (slugs) THEN
            RAISE EXCEPTION 'invalid flow shape: step "%" is defined twice', st ->> 'slug' USING ERRCODE = '22023';
        END IF;
        t := coalesce(st ->> 'type', 'single');
        IF jsonb_typeof(st -> 'type') NOT IN ('string', 'null') OR t NOT IN ('single', 'map', 'signal') THEN
            RAISE EXCEPTION 'invalid flow shape: steps[%].type must be "single", "map" or "signal"', i USING ERRCODE = '22023';
        END IF;
        IF st -> 'deps' IS NULL OR st -> 'deps' = 'null'::jsonb THEN
            deps := '{}';
        ELSIF jsonb_typeof(st -> 'deps') <> 'array' THEN
            RAISE EXCEPTION 'invalid flow shape: steps[%].deps must be an array of step slugs', i USING ERRCODE = '22023';
        ELSE
            deps := '{}';
            FOR d IN SELECT value FROM jsonb_array_elements(st -> 'deps') LOOP
                IF jsonb_typeof(d) <> 'string' THEN
                    RAISE EXCEPTION 'invalid flow shape: steps[%].deps must be an array of step slugs', i
                        USING ERRCODE = '22023';
                END IF;
                PERFORM pgflow._check_name(d #>> '{}', format('steps[%s].deps', i));
                IF d #>> '{}' = ANY (deps) THEN
                    RAISE EXCEPTION 'invalid flow shape: step "%" names dependency "%" twice', st ->> 'slug', d #>> '{}'
                        USING ERRCODE = '22023';
                END IF;
                deps := deps || (d #>> '{}');
            END LOOP;
        END IF;
        IF t = 'map' AND cardinality(deps) > 1 THEN
            RAISE EXCEPTION 'invalid flow shape: map step "%" has % dependencies; a map step has at most one',
                st ->> 'slug', cardinality(deps) USING ERRCODE = '22023';
        END IF;
        PERFORM pgflow._check_option(where_ || 'max_attempts', pgflow._shape_int(st, 'max_attempts', where_, true), 1, 100, true);
        PERFORM pgflow._check_option(where_ || 'base_delay', pgflow._shape_int(st, 'base_delay', where_, true), 0, 86400, true);
        PERFORM pgflow._check_option(where_ || 'timeout', pgflow._shape_int(st, 'timeout', where_, true), 1,
                                     CASE WHEN t = 'signal' THEN 31536000 ELSE 86400 END, true);
        PERFORM pgflow._check_option(where_ || 'start_delay', pgflow._shape_int(st, 'start_delay', where_, true), 0, 31536000, true);
        IF jsonb_typeof(st -> 'when_unmet') NOT IN ('string', 'null') OR jsonb_typeof(st -> 'when_exhausted') NOT IN ('string', 'null') THEN
            RAISE EXCEPTION 'invalid flow shape: %when_unmet and %when_exhausted must be strings', where_, where_
                USING ERRCODE = '22023';
        END IF;
        PERFORM pgflow._check_condition(nullif(st -> 'if', 'null'::jsonb), nullif(st -> 'if_not', 'null'::jsonb),
                                        coalesce(st ->> 'when_unmet', 'skip'), coalesce(st ->> 'when_exhausted', 'fail'),
                                        ARRAY['invalid flow shape: ' || where_ || 'if', 'invalid flow shape: ' || where_ || 'if_not',
                                              'invalid flow shape: ' || where_ || 'when_unmet',
                                              'invalid flow shape: ' || where_ || 'when_exhausted']);
        slugs := slugs || (st ->> 'slug');
        steps := steps || (jsonb_strip_nulls(jsonb_build_object(
            'slug', st ->> 'slug', 'type', t,
            'max_attempts', pgflow._shape_int(st, 'max_attempts', where_, true),
            'base_delay', pgflow._shape_int(st, 'base_delay', where_, true),
            'timeout', pgflow._shape_int(st, 'timeout', where_, true),
            'start_delay', pgflow._shape_int(st, 'start_delay', where_, true),
            'if', nullif(st -> 'if', 'null'::jsonb),
            'if_not', nullif(st -> 'if_not', 'null'::jsonb),
            'when_unmet', nullif(st ->> 'when_unmet', 'skip'),
            'when_exhausted', nullif(st ->> 'when_exhausted', 'fail')))
            || jsonb_build_object('deps', to_jsonb(deps)));
        i := i + 1;
    END LOOP;
    -- every dependency must be a step of the shape
    FOR i IN 1 .. cardinality(steps) LOOP
        FOR d IN SELECT value FROM jsonb_array_elements(steps[i] -> 'deps') LOOP
            IF NOT (d #>> '{}' = ANY (slugs)) THEN
                RAISE EXCEPTION 'invalid flow shape: dependency "%" of step "%" is not a step of the shape',
                    d #>> '{}', slugs[i] USING ERRCODE = '22023';
            END IF;
            IF d #>> '{}' = slugs[i] THEN
                RAISE EXCEPTION 'invalid flow shape: step "%" depends on itself', slugs[i] USING ERRCODE = '22023';
            END IF;
        END LOOP;
    END LOOP;
    -- order: repeatedly place the first step (in input order) whose deps are all placed
    n := cardinality(steps);
    WHILE cardinality(placed) < n LOOP
        progress := false;
        FOR i IN 1 .. n LOOP
            IF NOT (slugs[i] = ANY (placed))
               AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(steps[i] -> 'deps') x(v) WHERE NOT (x.v = ANY (placed))) THEN
                placed := placed || slugs[i];
                out_steps := out_steps || jsonb_build_array(steps[i]);
                progress := true;
                EXIT;
            END IF;
        END LOOP;
        IF NOT progress THEN
            RAISE EXCEPTION 'invalid flow shape: steps % form a dependency cycle',
                left(array_to_string(ARRAY(SELECT x FROM unnest(slugs) x WHERE NOT (x = ANY (placed))), ', '), 400)
                USING ERRCODE = '22023', HINT = 'A flow is a DAG: no step may depend, directly or not, on itself.';
        END IF;
    END LOOP;
    RETURN jsonb_build_object(
        'max_attempts', coalesce(pgflow._shape_int(shape, 'max_attempts', '', true), 3),
        'base_delay', coalesce(pgflow._shape_int(shape, 'base_delay', '', true), 1),
        'timeout', coalesce(pgflow._shape_int(shape, 'timeout', '', true), 60),
        'steps', out_steps);
END
$$;

CREATE FUNCTION pgflow.create_flow_from_shape(flow_slug text, shape jsonb) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    canon jsonb;
    st jsonb;
BEGIN
    PERFORM pgflow._check_name(create_flow_from_shape.flow_slug, 'flow_slug');
    canon := pgflow._canonical_shape(create_flow_from_shape.shape);
    PERFORM pgflow._check_option('max_attempts', (canon ->> 'max_attempts')::integer, 1, 100, false);
    PERFORM pgflow._check_option('base_delay', (canon ->> 'base_delay')::integer, 0, 86400, false);
    PERFORM pgflow._check_option('timeout', (canon ->> 'timeout')::integer, 1, 86400, false);
    PERFORM pgflow._lock_flow(create_flow_from_shape.flow_slug, true);
    PERFORM 1 FROM pgflow.flows WHERE flow_slug = create_flow_from_shape.flow_slug FOR UPDATE;
    IF FOUND THEN
        IF pgflow.get_flow_shape(create_flow_from_shape.flow_slug) = canon THEN
            RETURN false;
        END IF;
        RAISE EXCEPTION 'flow "%" already exists with another shape', create_flow_from_shape.flow_slug
            USING ERRCODE = '42710',
                  HINT = 'Compare with pgflow.get_flow_shape(flow_slug); drop the flow with pgflow.drop_flow, or use another flow_slug.';
    END IF;
    PERFORM pgflow.create_flow(create_flow_from_shape.flow_slug, (canon ->> 'max_attempts')::integer,
                               (canon ->> 'base_delay')::integer, (canon ->> 'timeout')::integer);
    FOR st IN SELECT value FROM jsonb_array_elements(canon -> 'steps') LOOP
        PERFORM pgflow.add_step(create_flow_from_shape.flow_slug, st ->> 'slug',
                                ARRAY(SELECT jsonb_array_elements_text(st -> 'deps')),
                                (st ->> 'max_attempts')::integer, (st ->> 'base_delay')::integer,
                                (st ->> 'timeout')::integer, (st ->> 'start_delay')::integer, st ->> 'type',
                                st -> 'if', st -> 'if_not', coalesce(st ->> 'when_unmet', 'skip'),
                                coalesce(st ->> 'when_exhausted', 'fail'));
    END LOOP;
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgflow.create_flow_from_shape(text, jsonb) IS
'Create a whole flow from one JSON document, in one step: {"max_attempts","base_delay","timeout" (optional, defaults 3, 1, 60), "steps":[{"slug", "type" ("single", "map" or "signal", default single), "deps" (default []), "max_attempts","base_delay","timeout","start_delay", "if","if_not","when_unmet","when_exhausted" (optional; as add_step''s if_input, if_not_input, when_unmet and when_exhausted)}]}. Steps may be listed in any order that has no cycle. Returns true if created, false if the flow exists with the same shape; another shape fails with 42710. An invalid shape (unknown key, bad slug or option, duplicate step, unknown dependency, cycle) fails with 22023 naming the problem and creates nothing.';

CREATE FUNCTION pgflow.drop_flow(flow_slug text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    PERFORM pgflow._check_name(drop_flow.flow_slug, 'flow_slug');
    -- first in the lock order: waits for start_flow, complete_task and fail_task under way
    PERFORM pgflow._lock_flow(drop_flow.flow_slug, true);
    PERFORM 1 FROM pgflow.flows WHERE flow_slug = drop_flow.flow_slug FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- Then its messages, before its tasks: a claim locks messages, then their tasks, so this
    -- waits for the claims under way instead of deadlocking with them, and a claim that comes
    -- later finds nothing to take.
    DELETE FROM pgflow.messages m USING pgflow.queues q
     WHERE q.queue_name = drop_flow.flow_slug AND m.queue_id = q.queue_id;
    DELETE FROM pgflow.step_tasks t USING pgflow.runs r
     WHERE r.flow_slug = drop_flow.flow_slug AND t.run_id = r.run_id;
    DELETE FROM pgflow.step_states s USING pgflow.runs r
     WHERE r.flow_slug = drop_flow.flow_slug AND s.run_id = r.run_id;
    DELETE FROM pgflow.run_retries rr USING pgflow.runs r
     WHERE r.flow_slug = drop_flow.flow_slug AND rr.run_id = r.run_id;
    DELETE FROM pgflow.signals sg USING pgflow.runs r
     WHERE r.flow_slug = drop_flow.flow_slug AND sg.run_id = r.run_id;
    DELETE FROM pgflow.signal_waits w WHERE w.flow_slug = drop_flow.flow_slug;
    DELETE FROM pgflow.runs WHERE flow_slug = drop_flow.flow_slug;
    DELETE FROM pgflow.deps WHERE flow_slug = drop_flow.flow_slug;
    DELETE FROM pgflow.steps WHERE flow_slug = drop_flow.flow_slug;
    DELETE FROM pgflow.flows WHERE flow_slug = drop_flow.flow_slug;
    UPDATE pgflow.queues SET managed_by = NULL WHERE queue_name = drop_flow.flow_slug;
    PERFORM pgflow.drop_queue(drop_flow.flow_slug);
    RETURN true;
END
$$;
COMMENT ON FUNCTION pgflow.drop_flow(text) IS
'Drop a flow with its steps, all its runs, their step states, tasks, signals and retry history, and its queue (with the queue''s messages). Returns false if there is no such flow.';
