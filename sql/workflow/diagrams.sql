-- Diagrams: a flow, or a run of it, as a Mermaid flowchart (https://mermaid.js.org), for
-- documentation, dashboards and psql (paste the text into any Mermaid renderer). Nodes are
-- named s<step_index>, never by slug (a slug such as "end" is a Mermaid keyword); labels hold
-- slugs, step types and statuses only, never inputs, outputs or error texts.

-- The one place diagrams are drawn: the flow's steps and edges, and when `run` (the document
-- of pgflow.get_run_with_states) is given, each step's status and a map step's task counts.
CREATE FUNCTION pgflow._mermaid(flow_slug text, run jsonb) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lines text[];
    st record;
    state jsonb;
    status text;
    label text;
BEGIN
    lines := ARRAY['---',
                   -- quoted: a YAML value may not hold ': ' bare
                   format('title: "%s"', CASE WHEN run IS NULL THEN 'flow ' || flow_slug
                                              ELSE format('run %s of %s: %s', run->>'run_id', flow_slug, run->>'status') END),
                   '---',
                   'flowchart TD'];
    FOR st IN
        SELECT s.step_slug, s.step_type, s.step_index, s.opt_start_delay,
               s.if_input IS NOT NULL OR s.if_not_input IS NOT NULL AS conditional
          FROM pgflow.steps s WHERE s.flow_slug = _mermaid.flow_slug ORDER BY s.step_index
    LOOP
        label := st.step_slug;
        IF st.step_type <> 'single' THEN
            label := label || '<br/>' || st.step_type;
        END IF;
        IF st.conditional THEN
            label := label || '<br/>if condition';
        END IF;
        IF st.opt_start_delay > 0 THEN
            label := label || format('<br/>starts after %s s', st.opt_start_delay);
        END IF;
        IF run IS NULL THEN
            status := CASE WHEN st.step_type = 'single' THEN 'step' ELSE st.step_type END;
        ELSE
            SELECT e INTO state FROM jsonb_array_elements(run->'steps') e WHERE e->>'step_slug' = st.step_slug;
            status := coalesce(state->>'status', 'created');
            label := label || '<br/>' || status;
            IF st.step_type = 'map' AND state->>'initial_tasks' IS NOT NULL THEN
                label := label || format(': %s/%s tasks done', state->'tasks'->>'completed', state->>'initial_tasks');
            END IF;
            IF (state->'tasks'->>'attempts')::integer > 1 AND st.step_type = 'single' THEN
                label := label || format(', %s attempts', state->'tasks'->>'attempts');
            END IF;
        END IF;
        -- shapes: a map step is a subroutine box, a signal step a flag, a step with a condition
        -- a hexagon
        lines := lines || format('    s%s%s"%s"%s:::%s', st.step_index,
                                 CASE WHEN st.step_type = 'map' THEN '[[' WHEN st.step_type = 'signal' THEN '>'
                                      WHEN st.conditional THEN '{{' ELSE '[' END,
                                 label,
                                 CASE WHEN st.step_type = 'map' THEN ']]' WHEN st.step_type = 'signal' THEN ']'
                                      WHEN st.conditional THEN '}}' ELSE ']' END,
                                 status);
    END LOOP;
    lines := lines || ARRAY(
        SELECT format('    s%s --> s%s', dep.step_index, s.step_index)
          FROM pgflow.deps d
          JOIN pgflow.steps s ON s.flow_slug = d.flow_slug AND s.step_slug = d.step_slug
          JOIN pgflow.steps dep ON dep.flow_slug = d.flow_slug AND dep.step_slug = d.dep_slug
         WHERE d.flow_slug = _mermaid.flow_slug
         ORDER BY s.step_index, d.dep_index);
    lines := lines || ARRAY[
        '    classDef step fill:#f8fafc,stroke:#475569,color:#0f172a',
        '    classDef map fill:#eef2ff,stroke:#4f46e5,color:#1e1b4b,stroke-width:2px',
        '    classDef created fill:#f4f4f5,stroke:#a1a1aa,color:#3f3f46',
        '    classDef started fill:#dbeafe,stroke:#2563eb,color:#1e3a8a',
        '    classDef completed fill:#dcfce7,stroke:#16a34a,color:#14532d',
        '    classDef failed fill:#fee2e2,stroke:#dc2626,color:#7f1d1d',
        '    classDef cancelled fill:#e5e7eb,stroke:#4b5563,color:#374151,stroke-dasharray:4 3',
        '    classDef skipped fill:#fefce8,stroke:#ca8a04,color:#713f12,stroke-dasharray:2 2',
        '    classDef signal fill:#fdf4ff,stroke:#a21caf,color:#4a044e',
        '    classDef waiting fill:#fae8ff,stroke:#a21caf,color:#4a044e,stroke-width:3px'];
    RETURN array_to_string(lines, E'\n') || E'\n';
END
$$;

CREATE FUNCTION pgflow.flow_mermaid(flow_slug text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN pgflow._mermaid((pgflow._flow(flow_mermaid.flow_slug)).flow_slug, NULL);
END
$$;
COMMENT ON FUNCTION pgflow.flow_mermaid(text) IS
'The flow as a Mermaid flowchart (text): one node per step (map steps drawn as subroutines marked "map", signal steps as flags marked "signal", steps with a condition as hexagons marked "if condition", start delays noted), one edge per dependency. Render it with any Mermaid renderer.';

CREATE FUNCTION pgflow.run_mermaid(run_id uuid) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    run jsonb;
BEGIN
    run := pgflow.get_run_with_states(run_mermaid.run_id);
    RETURN pgflow._mermaid(run->>'flow_slug', run);
END
$$;
COMMENT ON FUNCTION pgflow.run_mermaid(uuid) IS
'A run as a Mermaid flowchart (text): its flow''s graph with each step coloured and labelled by its state (created, started, waiting for a signal, completed, failed, cancelled, skipped), map steps with their completed and total task counts, single steps with their attempts when more than one; the title holds the run id and status.';
