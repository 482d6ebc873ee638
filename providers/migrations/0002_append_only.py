"""Usage records and conflicts are append-only, enforced by PostgreSQL.

UPDATE, DELETE and TRUNCATE raise SQLSTATE TP001 ("providers append-only"), so no
code path (ORM, raw SQL, admin, shell) can change stored usage. Emptying a whole
test database goes through config.db, which flushes with
session_replication_role = replica (ordinary triggers do not fire there).
"""

from django.db import migrations

APPEND_ONLY_SQL = """
CREATE FUNCTION providers_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION USING ERRCODE = 'TP001',
    MESSAGE = format('%s is append-only: %s refused', TG_TABLE_NAME, TG_OP);
END $$;

CREATE TRIGGER providers_usagerecord_immutable BEFORE UPDATE OR DELETE
  ON providers_usagerecord FOR EACH ROW EXECUTE FUNCTION providers_refuse_change();
CREATE TRIGGER providers_usagerecord_no_truncate BEFORE TRUNCATE
  ON providers_usagerecord FOR EACH STATEMENT EXECUTE FUNCTION providers_refuse_change();
CREATE TRIGGER providers_usageconflict_immutable BEFORE UPDATE OR DELETE
  ON providers_usageconflict FOR EACH ROW EXECUTE FUNCTION providers_refuse_change();
CREATE TRIGGER providers_usageconflict_no_truncate BEFORE TRUNCATE
  ON providers_usageconflict FOR EACH STATEMENT EXECUTE FUNCTION providers_refuse_change();
"""

REVERSE_SQL = """
DROP TRIGGER providers_usageconflict_no_truncate ON providers_usageconflict;
DROP TRIGGER providers_usageconflict_immutable ON providers_usageconflict;
DROP TRIGGER providers_usagerecord_no_truncate ON providers_usagerecord;
DROP TRIGGER providers_usagerecord_immutable ON providers_usagerecord;
DROP FUNCTION providers_refuse_change();
"""


class Migration(migrations.Migration):
    dependencies = [("providers", "0001_initial")]

    operations = [migrations.RunSQL(APPEND_ONLY_SQL, REVERSE_SQL)]
