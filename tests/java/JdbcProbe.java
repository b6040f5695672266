// pgJDBC through pgsluice (tests/test_tls.py): java -cp postgresql.jar JdbcProbe.java URL USER PASSWORD
// Prints "ok <current_user> <inet_server_port() is null>" or "error <SQLSTATE> <message>".
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;

public class JdbcProbe {
    public static void main(String[] args) {
        try (Connection conn = DriverManager.getConnection(args[0], args[1], args[2])) {
            try (PreparedStatement st = conn.prepareStatement("SELECT current_user, ? + 1")) {
                st.setInt(1, 41);
                try (ResultSet rs = st.executeQuery()) {
                    rs.next();
                    System.out.println("ok " + rs.getString(1) + " " + rs.getInt(2));
                }
            }
        } catch (SQLException e) {
            System.out.println("error " + e.getSQLState() + " " + e.getMessage());
        }
    }
}
