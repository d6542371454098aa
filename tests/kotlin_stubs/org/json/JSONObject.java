// Compile-only stand-in for the Android/LiteRT/ExecuTorch API that the bundle's Kotlin uses.
package org.json;
public class JSONObject {
  public JSONObject(String json) {}
  public double getDouble(String name) { return 0; }
  public int getInt(String name) { return 0; }
  public String getString(String name) { return null; }
  public JSONArray getJSONArray(String name) { return null; }
}
