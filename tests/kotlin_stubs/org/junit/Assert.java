// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package org.junit;
public class Assert {
  public static void assertEquals(String message, long expected, long actual) {}
  public static void assertEquals(String message, Object expected, Object actual) {}
  public static void assertTrue(String message, boolean condition) {}
}
